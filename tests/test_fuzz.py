"""Corrupt GGUF files: a seeded fuzz run over the tiny model, and one named case per failure class it found.

Every mutant (``tests/gguf_mutants.py``) goes through ``ds4nb info``; those that
load also through a one-token ``generate --backend cpu``.  Each outcome must be
a clean one-line error (exit 2) or a correct load: no traceback, no hang, no
corrupt file accepted, no legal edit refused.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import pytest

import gguf_mutants as gm

FUZZ_SEED = int(os.environ.get("DS4NB_FUZZ_SEED", "0"))
FUZZ_COUNT = int(os.environ.get("DS4NB_FUZZ_COUNT", "1000"))
KINDS = {"truncate", "magic-version", "header-count", "string-length", "array-count", "array-type", "value-type",
         "metadata-range", "metadata-legal", "alignment", "offset", "shape", "ndim", "tensor-type", "duplicate-name",
         "duplicate-key", "special-token", "flip-structure", "flip-header", "hash-table", "append", "tokenizer",
         "name-text", "data-flip"}


@pytest.fixture(scope="module")
def pristine(tiny_gguf: Path) -> bytes:
    return tiny_gguf.read_bytes()


@pytest.fixture(scope="module")
def layout(pristine: bytes) -> gm.Layout:
    return gm.walk(pristine)


def test_fuzz_every_mutant_fails_cleanly_or_loads(pristine: bytes, tmp_path: Path) -> None:
    summary = gm.run_all(pristine, tmp_path, seed=FUZZ_SEED, count=FUZZ_COUNT)
    kinds = {r.mutant.kind for r in summary.results}
    print(f"{len(summary.results)} mutants in {summary.seconds:.1f} s (seed {FUZZ_SEED}); "
          f"info {dict(summary.counts('info'))}; generate {dict(summary.counts('generate'))}")
    failures = [f"{r.mutant.name}: info {r.info}, generate {r.generate}: {r.detail}" for r in summary.failures()]
    assert not failures, "\n".join(failures[:20])
    assert len(summary.results) >= 500
    # the run exercised every kind of mutation
    assert kinds == KINDS
    counts = summary.counts("info")
    assert counts["clean-error"] > 300 and counts["ok"] > 40


def test_pristine_file_is_plausible_and_loads(pristine: bytes, tmp_path: Path) -> None:
    """The fuzz test's own yardsticks accept the unmutated file."""
    assert gm.plausibility_problems(pristine) == []
    r = gm.run_mutant(gm.Mutant("none", "pristine", pristine, "load"), tmp_path, 0)
    assert (r.info, r.generate) == ("ok", "ok")


# ---------------------------------------------------------------------------
# named regression cases: one per class of failure the fuzzer found before the reader was hardened


def _put(data: bytes, at: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def _kv(lay: gm.Layout, key: str) -> gm.KV:
    return lay.kvs[key]


def _tensor(lay: gm.Layout, name: str) -> gm.TensorField:
    return next(t for t in lay.tensors if t.name == name)


def _f32(key: str, value: float):
    return lambda d, lay: _put(d, _kv(lay, f"deepseek4.{key}").value_at, "<f", value)


def _u32(key: str, value: int):
    return lambda d, lay: _put(d, _kv(lay, f"deepseek4.{key}").value_at, "<I", value)


def _offset(name: str, delta: int):
    return lambda d, lay: _put(d, _tensor(lay, name).offset_at, "<Q", _tensor(lay, name).offset + delta)


# case -> (mutation, words the one-line error must contain).  Before the fix each of these was a
# traceback (MemoryError, OverflowError, math domain error, rich MarkupError), a hang, a multi-line
# error, or a corrupt file that loaded.
REGRESSIONS = {
    # lengths and counts past the end of the file: MemoryError / OverflowError before
    "string-length-past-end": (lambda d, lay: _put(d, _kv(lay, "general.name").value_at, "<Q", 1 << 62),
                               ("truncated or corrupt", "general.name")),
    "key-length-past-end": (lambda d, lay: _put(d, _kv(lay, "general.alignment").key_at, "<Q", (1 << 64) - 1),
                            ("truncated or corrupt", "metadata entry 2")),
    "array-count-past-end": (lambda d, lay: _put(d, _kv(lay, "tokenizer.ggml.token_type").value_at + 4, "<Q",
                                                 (1 << 63) - 1), ("truncated or corrupt", "token_type")),
    "kv-count-past-end": (lambda d, lay: _put(d, lay.n_kv_at, "<Q", 1 << 40), ("truncated or corrupt",)),
    "tensor-name-length-past-end": (lambda d, lay: _put(d, lay.tensors[5].name_at, "<Q", 1 << 31),
                                    ("truncated or corrupt", "tensor info 5")),
    "value-type-misparse": (lambda d, lay: _put(d, _kv(lay, "deepseek4.rope.freq_base").type_at, "<I", gm.F64),
                            ("truncated or corrupt", "metadata entry 31")),
    # text: invalid UTF-8 was replaced and accepted; control characters broke the one-line rule
    "tensor-name-not-utf8": (lambda d, lay: _put(d, lay.tensors[3].name_at + 8, "<B", 0xC3),
                             ("tensor info 3", "not valid UTF-8")),
    "key-not-utf8": (lambda d, lay: _put(d, _kv(lay, "general.name").key_at + 8, "<B", 0xFF),
                     ("metadata entry 1", "not valid UTF-8")),
    "control-chars-in-error": (lambda d, lay: _put(_put(d, _tensor(lay, "output.weight").name_at + 8, "<B", 0x0A),
                                                   _tensor(lay, "output.weight").type_at, "<I", 99),
                               ("tensor \\nutput.weight has unknown GGML type 99",)),
    "bool-byte-not-0-or-1": (lambda d, lay: _put(d, _kv(lay, "deepseek4.expert_weights_norm").value_at, "<B", 7),
                             ("expert_weights_norm", "bool byte 7")),
    # tensor offsets and sizes: each of these loaded before
    "offset-misaligned": (_offset("blk.1.attn_kv.weight", 4), ("blk.1.attn_kv.weight", "not a multiple of")),
    "offset-overlaps-previous": (_offset("blk.1.attn_kv.weight", -32), ("blk.1.attn_kv.weight", "overlaps")),
    "offset-past-data-end": (_offset("output.weight", 64), ("output.weight", "past the end")),
    "size-does-not-match-type": (lambda d, lay: _put(d, _tensor(lay, "blk.0.ffn_down_exps.weight").type_at, "<I", 16),
                                 ("blk.0.ffn_down_exps.weight", "gap")),
    "offsets-swapped": (lambda d, lay: _put(_put(d, _tensor(lay, "blk.0.attn_norm.weight").offset_at, "<Q",
                                                 _tensor(lay, "blk.0.attn_q_a.weight").offset),
                                            _tensor(lay, "blk.0.attn_q_a.weight").offset_at, "<Q",
                                            _tensor(lay, "blk.0.attn_norm.weight").offset), ("overlaps",)),
    # metadata ranges: tracebacks in generate (math domain error, float->int overflow), a hang, or a load
    "yarn-beta-negative": (_f32("rope.scaling.yarn_beta_slow", -1.0), ("yarn_beta_slow", "-1")),
    "yarn-betas-equal": (_f32("rope.scaling.yarn_beta_fast", 1.0), ("yarn_beta_fast", "must exceed")),
    "rms-eps-nan": (_f32("attention.layer_norm_rms_epsilon", math.nan), ("layer_norm_rms_epsilon", "nan")),
    "hc-eps-too-large": (_f32("hyper_connection.epsilon", 0.5), ("hyper_connection.epsilon", "0.5")),
    "rope-base-infinite": (_f32("rope.freq_base", math.inf), ("rope.freq_base", "inf")),
    "rope-factor-below-one": (_f32("rope.scaling.factor", 0.5), ("rope.scaling.factor",)),
    "expert-scale-huge": (_f32("expert_weights_scale", 1e30), ("expert_weights_scale",)),
    "sinkhorn-iterations-huge": (_u32("hyper_connection.sinkhorn_iterations", (1 << 32) - 1),
                                 ("sinkhorn_iterations",)),
    "window-huge": (_u32("attention.sliding_window", 1 << 31), ("sliding_window",)),
    "indexer-top-k-over-kernel-limit": (_u32("attention.indexer.top_k", 4096), ("indexer.top_k", "1024")),
    "context-length-zero": (lambda d, lay: _put(d, _kv(lay, "deepseek4.context_length").value_at, "<Q", 0),
                            ("context_length",)),
    "rope-orig-ctx-zero": (lambda d, lay: _put(d, _kv(lay, "deepseek4.rope.scaling.original_context_length").value_at,
                                               "<Q", 0), ("original_context_length",)),
    "swiglu-clamp-nan": (lambda d, lay: _put(d, _kv(lay, "deepseek4.swiglu_clamp_exp").item_at[2], "<f", math.nan),
                         ("swiglu_clamp_exp[2]",)),
    # data the engine indexes with: an out-of-range expert id was an IndexError (or a wild GPU read)
    "hash-table-expert-out-of-range": (
        lambda d, lay: _put(d, lay.data_offset + _tensor(lay, "blk.0.ffn_gate_tid2eid.weight").offset + 4 * 77, "<i",
                            8), ("blk.0.ffn_gate_tid2eid.weight", "expert id 8")),
    "hash-table-expert-negative": (
        lambda d, lay: _put(d, lay.data_offset + _tensor(lay, "blk.0.ffn_gate_tid2eid.weight").offset, "<i", -5),
        ("expert id -5",)),
}


@pytest.mark.parametrize("case", sorted(REGRESSIONS))
def test_regression_case_is_one_clean_line(case: str, pristine: bytes, layout: gm.Layout, tmp_path: Path) -> None:
    mutate, needles = REGRESSIONS[case]
    data = mutate(pristine, layout)
    assert data != pristine
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(data)
    for argv in (["info", str(path)], ["generate", "-m", str(path), *gm.GENERATE_ARGS]):
        run = gm.run_cli(argv)
        assert run.outcome() == "clean-error", (argv[0], run.exc or run.stderr)
        for needle in needles:
            assert needle in run.stderr, (needle, run.stderr)
    assert gm.plausibility_problems(data) or case.startswith(("hash-table", "bool-byte")), \
        "the independent check should agree that this file is corrupt"


def test_markup_in_general_name_is_shown_literally(pristine: bytes, layout: gm.Layout, tmp_path: Path) -> None:
    """A name full of rich markup was a MarkupError traceback in ``info``; now it is printed as written."""
    kv = layout.kvs["general.name"]
    n = len(kv.value.encode())
    name = ("[/][bold]\x1b[2J" * n)[:n]
    data = pristine[:kv.value_at + 8] + name.encode() + pristine[kv.value_at + 8 + n:]
    path = tmp_path / "markup.gguf"
    path.write_bytes(data)
    info = gm.run_cli(["info", str(path)])
    assert info.outcome() == "ok", info.exc or info.stderr
    assert "[/][bold]\\x1b[2J" in info.stdout and "\x1b" not in info.stdout
    gen = gm.run_cli(["generate", "-m", str(path), *gm.GENERATE_ARGS])
    assert gen.outcome() == "ok", gen.exc or gen.stderr
    assert "[/][bold]\\x1b[2J" in gen.stderr and "\x1b" not in gen.stderr


def test_token_table_must_match_vocab_size(tmp_path: Path) -> None:
    """A shorter token table let generate sample ids the tokenizer cannot decode (a ValueError traceback)."""
    from dataclasses import replace

    from ds4nb.model.synth import plan_synthetic, write_plan

    plan = plan_synthetic("tiny", seed=1)
    meta = dict(plan.metadata)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        values, vtype = meta[key]
        meta[key] = (values[:-1], vtype)
    path = tmp_path / "short-vocab.gguf"
    write_plan(replace(plan, metadata=meta), path)
    run = gm.run_cli(["generate", "-m", str(path), *gm.GENERATE_ARGS])
    assert run.outcome() == "clean-error", run.exc or run.stderr
    assert "tokenizer.ggml.tokens has 4538 entries" in run.stderr and "4539" in run.stderr
