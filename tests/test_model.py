"""Model loading, the tensor schema and synthetic models (round trips, totals, bad files)."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize as gguf_dequantize

from ds4nb.cli import main
from ds4nb.model import expected_tensors, load_model
from ds4nb.model.presets import flash_config
from ds4nb.model.synth import plan_synthetic, tensor_bytes, write_plan, write_synthetic


@pytest.fixture(scope="module")
def fresh_tiny(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model with a fresh random seed, and the plan it was written from."""
    seed = int(np.random.default_rng().integers(0, 2**31))
    path = tmp_path_factory.mktemp("fresh") / "tiny.gguf"
    plan = write_synthetic(path, "tiny", seed=seed)
    return path, plan


def test_round_trip_bytes_values_and_metadata(fresh_tiny) -> None:
    path, plan = fresh_tiny
    model = load_model(path)
    reader = GGUFReader(path)  # an independent reader of the same file
    by_name = {t.name: t for t in reader.tensors}
    assert [t.name for t in model.catalog] == [t.name for t in plan.tensors]
    for planned in plan.tensors:
        info = model.tensor(planned.name)
        theirs = by_name[planned.name]
        assert info.qtype == planned.qtype and int(theirs.tensor_type) == planned.qtype
        assert info.shape == planned.spec.shape == tuple(reversed(theirs.shape.tolist()))
        # the file holds exactly the bytes the writer generated for this tensor
        expected = tensor_bytes(plan, planned.name)
        assert np.array_equal(np.asarray(info.data), expected), planned.name
        assert np.array_equal(np.asarray(theirs.data).view(np.uint8).reshape(-1), expected)
        if planned.qtype == Q.I32:
            ids = np.asarray(info.data).view("<i4").reshape(info.shape)
            assert ids.min() >= 0 and ids.max() < plan.config.n_expert
            assert all(len(set(row)) == len(row) for row in ids[:200].tolist())
            continue
        # gguf's own dequantizer sees the distribution the writer intended
        values = gguf_dequantize(np.asarray(info.data), planned.qtype).astype(np.float64)
        assert values.size == math.prod(info.shape) and np.isfinite(values).all()
        if values.size >= 256:
            mean, rms = values.mean(), np.sqrt(np.mean((values - values.mean()) ** 2))
            assert abs(mean - planned.init.mean) < 0.05 + 0.1 * planned.init.rms, planned.name
            assert 0.7 * planned.init.rms < rms < 1.3 * planned.init.rms, (planned.name, rms)
    for key, (value, vtype) in plan.metadata.items():
        got = model.metadata[key]
        if vtype == GGUFValueType.FLOAT32:
            assert np.allclose(np.float32(got), np.float32(value)), key
        elif isinstance(value, list) and value and isinstance(value[0], float):
            assert np.array_equal(np.float32(got), np.float32(value)), key
        else:
            assert got == value, key
        assert model.metadata_types[key] == vtype, key
    assert model.config == plan.config


def test_tiny_has_every_layer_kind(tiny_model) -> None:
    cfg = tiny_model.config
    kinds = {cfg.layer_kind(il) for il in range(cfg.n_layer)}
    assert kinds == {"swa", "csa", "hca"}
    assert any(cfg.is_hash_layer(il) for il in range(cfg.n_layer))
    layers = tiny_model.weights.layers
    for il, lw in enumerate(layers):
        kind = cfg.layer_kind(il)
        assert (lw.attn_compressor_kv is not None) == (kind != "swa")
        assert (lw.indexer_proj is not None) == (kind == "csa")
        assert (lw.ffn_gate_tid2eid is not None) == cfg.is_hash_layer(il)


def test_writer_is_deterministic_and_worker_independent(tmp_path: Path) -> None:
    seed = int(np.random.default_rng().integers(0, 2**31))
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_synthetic(a, "tiny", seed=seed, workers=1)
    plan = plan_synthetic("tiny", seed=seed)
    from ds4nb.model import synth

    # force the process pool even for a small file
    synth_units = synth._run_units

    def pooled(total, path, units, workers, progress):
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=2, initializer=synth._worker_open, initargs=(path,)) as pool:
            list(pool.map(synth._write_unit, *zip(*units)))

    synth._run_units = pooled
    try:
        write_plan(plan, b)
    finally:
        synth._run_units = synth_units
    assert a.read_bytes() == b.read_bytes()


def test_flash_plan_matches_the_published_q2_file() -> None:
    plan = plan_synthetic("flash")
    cfg = plan.config
    assert cfg == flash_config()
    # 80.76 GiB of tensors in the published q2-imatrix file (docs/runtime.md)
    assert abs(plan.total_bytes / 2**30 - 80.76) < 0.01
    counts: dict[str, int] = {}
    for t in plan.tensors:
        counts[t.spec.role] = counts.get(t.spec.role, 0) + 1
    assert counts["routed_expert"] == 3 * 43
    assert counts["compressor"] == 4 * 41
    assert counts["indexer"] == 6 * 21
    assert len(plan.tensors) == 1328
    q4 = plan_synthetic("flash", quant="q4")
    assert {t.qtype for t in q4.tensors if t.spec.role == "routed_expert"} == {Q.Q4_K}


def test_mtp_schema_is_recognised(tmp_path: Path) -> None:
    """An MTP support file (tensors under mtp.0.*) opens as kind 'mtp'."""
    plan = plan_synthetic("tiny", seed=3)
    specs = expected_tensors(plan.config, "mtp")
    from ds4nb.model.synth import PlannedTensor, _init_for, _qtype_for

    tensors = []
    for spec in specs:
        qtype = _qtype_for(spec, "q2")
        from gguf.constants import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[qtype]
        tensors.append(PlannedTensor(spec, qtype, _init_for(spec), len(tensors), math.prod(spec.shape) // block * size))
    mtp_plan = replace(plan, tensors=tuple(tensors))
    path = tmp_path / "mtp.gguf"
    write_plan(mtp_plan, path)
    model = load_model(path)
    assert model.kind == "mtp"
    assert model.weights.block.ffn_exp_probs_b is not None
    assert model.weights.e_proj.shape == (plan.config.n_embd, plan.config.n_embd)


# ---------------------------------------------------------------------------
# bad input: one clear line, exit status 2, nothing written


def _run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def _write_modified(tmp_path: Path, name: str, edit) -> Path:
    plan = plan_synthetic("tiny", seed=1)
    plan = edit(plan)
    path = tmp_path / name
    write_plan(plan, path)
    return path


def _with_tensor(plan, name: str, **changes):
    tensors = tuple(replace(t, **changes) if t.name == name else t for t in plan.tensors)
    return replace(plan, tensors=tensors)


def test_missing_file(capsys, tmp_path: Path) -> None:
    _assert_one_line_error(*_run_cli(capsys, "info", str(tmp_path / "nope.gguf")), "not found")


def test_not_a_gguf(capsys, tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    _assert_one_line_error(*_run_cli(capsys, "info", str(p)), "not a GGUF")


@pytest.mark.parametrize("fraction", [0.0005, 0.5, 0.999])
def test_truncated_file(capsys, tmp_path: Path, tiny_gguf: Path, fraction: float) -> None:
    data = tiny_gguf.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: int(len(data) * fraction)])
    _assert_one_line_error(*_run_cli(capsys, "info", str(p)), "truncated")


def test_wrong_architecture(capsys, tmp_path: Path) -> None:
    def edit(plan):
        meta = dict(plan.metadata)
        meta["general.architecture"] = ("llama", GGUFValueType.STRING)
        return replace(plan, metadata=meta)

    p = _write_modified(tmp_path, "arch.gguf", edit)
    _assert_one_line_error(*_run_cli(capsys, "info", str(p)), "general.architecture", "deepseek4")


def test_missing_tensor(capsys, tmp_path: Path) -> None:
    def edit(plan):
        return replace(plan, tensors=tuple(t for t in plan.tensors if t.name != "blk.2.indexer.proj.weight"))

    p = _write_modified(tmp_path, "missing.gguf", edit)
    _assert_one_line_error(*_run_cli(capsys, "info", str(p)), "blk.2.indexer.proj.weight", "missing")


def test_wrong_quant_type(capsys, tmp_path: Path) -> None:
    p = _write_modified(tmp_path, "qtype.gguf", lambda plan: _with_tensor(
        plan, "blk.1.attn_q_b.weight", qtype=Q.F32, nbytes=plan.config.q_dim * plan.config.q_lora_rank * 4))
    _assert_one_line_error(*_run_cli(capsys, "info", str(p)), "blk.1.attn_q_b.weight", "F32", "Q8_0")


def test_wrong_shape(capsys, tmp_path: Path) -> None:
    def edit(plan):
        t = next(t for t in plan.tensors if t.name == "blk.0.attn_kv.weight")
        shape = (t.spec.shape[0] * 2, t.spec.shape[1])
        return _with_tensor(plan, t.name, spec=replace(t.spec, shape=shape), nbytes=t.nbytes * 2)

    p = _write_modified(tmp_path, "shape.gguf", edit)
    _assert_one_line_error(*_run_cli(capsys, "info", str(p)), "blk.0.attn_kv.weight", "shape")


def test_metadata_key_of_wrong_type(capsys, tmp_path: Path) -> None:
    def edit(plan):
        meta = dict(plan.metadata)
        meta["deepseek4.expert_count"] = ("eight", GGUFValueType.STRING)
        return replace(plan, metadata=meta)

    p = _write_modified(tmp_path, "type.gguf", edit)
    _assert_one_line_error(*_run_cli(capsys, "info", str(p)), "deepseek4.expert_count", "integer")


def test_missing_metadata_key(capsys, tmp_path: Path) -> None:
    def edit(plan):
        meta = dict(plan.metadata)
        del meta["deepseek4.attention.indexer.top_k"]
        return replace(plan, metadata=meta)

    p = _write_modified(tmp_path, "nokey.gguf", edit)
    _assert_one_line_error(*_run_cli(capsys, "info", str(p)), "deepseek4.attention.indexer.top_k")


def test_synth_bad_output_dir_writes_nothing(capsys, tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "dir" / "m.gguf"
    _assert_one_line_error(*_run_cli(capsys, "synth", "--preset", "tiny", str(target)), "does not exist")
    assert not (tmp_path / "no").exists()


def test_synth_bad_flag(capsys, tmp_path: Path) -> None:
    _assert_one_line_error(*_run_cli(capsys, "synth", "--preset", "huge", str(tmp_path / "m.gguf")), "huge")
    _assert_one_line_error(*_run_cli(capsys, "synth", "--layers", "0", str(tmp_path / "m.gguf")), "--layers")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_synth_leaves_nothing(tmp_path: Path) -> None:
    def boom(done: int, total: int) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "m.gguf"
    with pytest.raises(KeyboardInterrupt):
        write_synthetic(out, "tiny", seed=2, progress=boom)
    assert list(tmp_path.iterdir()) == []


def test_info_and_synth_cli(capsys, tmp_path: Path) -> None:
    out = tmp_path / "t.gguf"
    assert main(["synth", "--preset", "tiny", "--seed", "5", str(out)]) == 0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("routed_expert", "IQ2_XXS", "Q2_K", "Q8_0", "total", "tensor catalog"):
        assert needle in text
    copy = tmp_path / "copy.gguf"
    shutil.copy(out, copy)
    assert load_model(copy).config == load_model(out).config


def test_header_reader_agrees_with_gguf_reader(fresh_tiny) -> None:
    """ds4nb's fast header parser against the gguf package's GGUFReader, field by field."""
    from ds4nb.model.gguf_header import read_header

    path, _ = fresh_tiny
    ours = read_header(path)
    theirs = GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.metadata) == set(fields)
    for key, f in fields.items():
        main_type = f.types[0]
        elem_type = f.types[-1]
        assert ours.types[key] == (elem_type if main_type == GGUFValueType.ARRAY else main_type), key
        assert ours.metadata[key] == f.contents(), key
    assert [(t.name, t.dims, t.qtype, ours.data_offset + t.offset) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset)) for t in theirs.tensors]
