"""The ``ds4nb`` command line.

Each subcommand is a small function; user errors (:class:`Ds4Error`) become one
red line on stderr and exit status 2, never a traceback.  Text that comes from
a file or the user (a model name, a path) is shown escaped, never read as rich
markup; output piped into another program is not cut to a terminal's width,
and a reader that stops early (``| head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterator, Sequence

from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID,
                           TextColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from ds4nb import __version__
from ds4nb.errors import Ds4Error, UsageError, shown, shown_path

if TYPE_CHECKING:
    from ds4nb.bench import Sweep

if TYPE_CHECKING:
    from ds4nb.cache.options import PlacementOptions

DEFAULT_CTX = 32768  # the reference CLI's default context
PIPE_WIDTH = 10_000  # columns when the output is not a terminal: lines are never cut or wrapped
ERROR_LIMIT = 2000   # characters of an error message


class _Console(Console):
    """A rich console that lays out for the terminal, or, when piped or redirected, for no width limit."""

    @property
    def size(self) -> ConsoleDimensions:
        if not self.is_terminal:
            return ConsoleDimensions(PIPE_WIDTH, 25)
        return super().size

    def on_broken_pipe(self) -> None:
        # rich would exit with status 1; a reader that stopped early is not a failure: main() ends quietly
        self.quiet = True
        raise BrokenPipeError


console = _Console()
err_console = _Console(stderr=True)


def _safe(value: object, limit: int = 400) -> str:
    """Untrusted text placed in rich markup: control characters escaped, shortened, markup escaped."""
    return escape(shown(value, limit))


# ---------------------------------------------------------------------------
# info


def cmd_info(args: argparse.Namespace) -> int:
    from ds4nb.model import load_model

    _check_env()
    model = load_model(args.model)
    cfg = model.config
    title = f"{_safe(model.name, 80)}  [dim]({_safe(model.path)}, {model.kind} file)[/dim]"
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("key", style="cyan")
    t.add_column("value")
    kinds = [cfg.layer_kind(il) for il in range(cfg.n_layer)]
    rows = [
        ("layers", f"{cfg.n_layer} ({kinds.count('swa')} sliding-window, {kinds.count('csa')} CSA ratio 4, "
                   f"{kinds.count('hca')} HCA; {cfg.n_hash_layer} hash-routed)"),
        ("embedding", f"{cfg.n_embd}  (vocab {cfg.n_vocab}, {cfg.n_hc} hyper-connection streams)"),
        ("attention", f"{cfg.n_head} heads x {cfg.head_dim} (rope {cfg.n_rot}), 1 kv head, q rank {cfg.q_lora_rank}, "
                      f"output {cfg.n_out_group} groups x rank {cfg.out_lora_rank}"),
        ("window / ratios", f"sliding {cfg.n_swa}; compress ratios {sorted(set(cfg.compress_ratios[:cfg.n_layer]))}"),
        ("indexer", f"{cfg.n_indexer_head} heads x {cfg.indexer_head_dim}, top-k {cfg.indexer_top_k}"),
        ("experts", f"{cfg.n_expert} routed ({cfg.n_expert_used} used, ff {cfg.n_ff_exp}) + {cfg.n_expert_shared} shared; "
                    f"weights scale {cfg.expert_weights_scale:g}"),
        ("rope / yarn", f"base {cfg.rope_freq_base:g} (compressed {cfg.compress_rope_freq_base:g}), factor "
                        f"{cfg.rope_scale_factor:g}, orig ctx {cfg.rope_orig_ctx}, beta {cfg.rope_yarn_beta_fast:g}/"
                        f"{cfg.rope_yarn_beta_slow:g}"),
        ("context", f"{cfg.context_length}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)

    by_role: dict[str, list] = defaultdict(list)
    for info in model.catalog:
        by_role[info.role or "(unused)"].append(info)
    rt = Table(title="tensor catalog", title_justify="left")
    for col, just in (("role", "left"), ("tensors", "right"), ("quant types", "left"), ("size", "right"),
                      ("share", "right")):
        rt.add_column(col, justify=just)
    total = model.tensor_bytes
    for role, infos in sorted(by_role.items(), key=lambda kv: -sum(i.nbytes for i in kv[1])):
        nbytes = sum(i.nbytes for i in infos)
        qtypes = ", ".join(sorted({i.qtype.name for i in infos}))
        rt.add_row(role, str(len(infos)), qtypes, format_bytes(nbytes), f"{100 * nbytes / total:.1f}%")
    rt.add_section()
    rt.add_row("total", str(len(model.catalog)), "", format_bytes(total), "100%", style="bold")
    console.print(rt)
    console.print(f"file: {format_bytes(model.file_size)}, {len(model.metadata)} metadata keys")
    console.print(Text(f"q8_0 dispatch: {_dispatch_decision(cfg, model.path)}"))
    return 0


def _dispatch_decision(cfg, path: Path) -> str:
    """The Q8_0 strategies a CUDA session of ``cfg`` would use here, as far as known without measuring."""
    from ds4nb.engine.backends import cuda_available

    if not cuda_available():
        return "no CUDA GPU here (the cpu backend needs none)"
    from ds4nb.dispatch.device import probe_device
    from ds4nb.engine.q8_timing import q8_dispatch

    probe = probe_device()
    decision = q8_dispatch(cfg, probe, measure=False)
    if decision.source == "default":
        return f"not measured yet on {shown(probe.name)}: run ds4nb dispatch -m {shown_path(path)}"
    return decision.describe()


def format_bytes(n: int) -> str:
    """GiB with two decimals for model-sized numbers, MiB below 1 GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


# ---------------------------------------------------------------------------
# kernels


def cmd_kernels(args: argparse.Namespace) -> int:
    from ds4nb.kernels.registry import KERNELS_TABLE_HEADER
    from ds4nb.plugins import get_registry

    t = Table(title="kernel registry", title_justify="left")
    for col in KERNELS_TABLE_HEADER:
        t.add_column(col)
    for row in get_registry().table():
        t.add_row(*row)
    console.print(t)
    return 0


# ---------------------------------------------------------------------------
# synth


def cmd_synth(args: argparse.Namespace) -> int:
    from ds4nb.model.synth import describe, write_synthetic

    with _bytes_progress(f"writing {_safe(args.out.name)}") as advance:
        t0 = time.perf_counter()
        plan = write_synthetic(args.out, args.preset, seed=args.seed, quant=args.quant, n_layer=args.layers,
                               workers=args.workers, progress=advance)
        dt = time.perf_counter() - t0
    console.print(f"[green]wrote[/green] {_safe(args.out)}: {args.preset} preset, {describe(plan, dt)}")
    return 0


class _GiBPerSecond(ProgressColumn):
    """Transfer rate in GiB/s (the unit load and bandwidth numbers use)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{speed / 2**30:.2f} GiB/s", style="progress.data.speed")


class _bytes_progress:
    """Context manager yielding a ``progress(done, total)`` callback drawing a rich bar."""

    def __init__(self, label: str) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 _GiBPerSecond(), TimeRemainingColumn(), console=err_console,
                                 transient=True)
        self.task = self.progress.add_task(label, total=None)

    def __enter__(self) -> Callable[[int, int], None]:
        self.progress.start()

        def advance(done: int, total: int) -> None:
            self.progress.update(self.task, completed=done, total=total)

        return advance

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


# ---------------------------------------------------------------------------
# generate


DEFAULT_MODEL_NOTE = (
    "[yellow]note:[/yellow] no -m given, so this runs the embedded default model: the real DS4 architecture and "
    "vocabulary with [bold]random weights[/bold]. It shows the whole engine working (tokenizer, chat template, "
    "prefill, decode, sampling) but its replies are gibberish. Run a real DS4 GGUF with -m FILE.gguf.")


def _load_for_run(model_arg: Path | None):
    """The model to run: ``-m`` or the embedded default (written on first use)."""
    from ds4nb.model import load_model
    from ds4nb.model.default import default_model_path, ensure_default_model

    if model_arg is not None:
        return load_model(model_arg)
    if not default_model_path().is_file():
        err_console.print(f"[dim]writing the embedded default model to {_safe(default_model_path())} (once)[/dim]")
        with _bytes_progress("default model") as advance:
            ensure_default_model(progress=advance)
    err_console.print(DEFAULT_MODEL_NOTE, highlight=False)
    return load_model(default_model_path())



def _read_prompt_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read --prompt-file {shown_path(path)}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompt-file {shown_path(path)} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start})") from None


def _check_env() -> None:
    """Environment settings that only a GPU engine reads, checked up front on every backend."""
    from ds4nb.dispatch.select import requested_strategy

    requested_strategy()


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from ds4nb.chat import StopCondition, render_prompt
    from ds4nb.engine.backends import open_engine
    from ds4nb.engine.generate import generate
    from ds4nb.sampling import SamplingParams
    from ds4nb.tokenizer import Tokenizer

    _check_env()
    placement = _placement_options(args)   # flags first: a bad one fails before any work
    params = SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    prompt = args.prompt if args.prompt_file is None else _read_prompt_file(args.prompt_file)
    model = _load_for_run(args.model)
    limit = model.config.context_length or None
    if args.ctx is None:
        args.ctx = min(DEFAULT_CTX, limit or DEFAULT_CTX)
    elif limit is not None and args.ctx > limit:
        raise UsageError(f"--ctx {args.ctx} is larger than the model's context length {limit}")
    tok = Tokenizer.from_gguf(model)
    ids = render_prompt(tok, prompt, system=args.system, think="none" if args.nothink else args.think, ctx=args.ctx)
    stop = StopCondition.for_tokenizer(tok, max_tokens=args.n)
    budget = stop.token_budget(args.ctx, len(ids))
    if budget <= 0:
        raise UsageError(f"the prompt has {len(ids)} tokens: no room to generate in --ctx {args.ctx}")
    with _bytes_progress("loading weights") as advance:
        engine, where = open_engine(model, args.backend, ctx=args.ctx, placement=placement,
                                    progress=advance)
    err_console.print(f"[dim]{_safe(model.name, 80)} | {where} | prompt {len(ids)} tokens[/dim]", highlight=False)

    def emit(text: str) -> None:
        console.out(text, end="", highlight=False)
        console.file.flush()

    with _PrefillProgress() as on_prefill_progress:
        out, stats = generate(engine, tok, ids, max_new_tokens=budget, params=params, stop=stop, on_text=emit,
                              rng=np.random.default_rng(args.seed), on_prefill_progress=on_prefill_progress)
    console.out("")
    err_console.print(Text(f"{stats.describe()} | {engine.describe()}", style="dim"))   # the path that ran
    return 130 if stats.stop == "interrupted" else 0


class _PrefillProgress:
    """Context manager yielding an ``on_prefill_progress(done, total)`` callback: a transient
    bar on a terminal's stderr that appears once a prefill has run for :attr:`DELAY` seconds."""

    DELAY = 1.0

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.started = 0.0

    def __enter__(self) -> Callable[[int, int], None]:
        return self.update

    def update(self, done: int, total: int) -> None:
        if done == 0:
            self.started = time.perf_counter()
        elif self.progress is None and err_console.is_terminal and time.perf_counter() - self.started >= self.DELAY:
            self.progress = Progress(TextColumn("prefill"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                                     TimeRemainingColumn(), console=err_console, transient=True)
            self.task = self.progress.add_task("prefill", total=total, completed=done)
            self.progress.start()
        if self.progress is not None:
            self.progress.update(self.task, completed=done)
            if done >= total:
                self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# bench


def cmd_bench(args: argparse.Namespace) -> int:
    import csv

    from ds4nb.bench import FILLER, BenchRow, check_sequence, frontiers, run_bench
    from ds4nb.engine.backends import open_engine, resolve_backend
    from ds4nb.tokenizer import Tokenizer

    _check_env()
    placement = _placement_options(args)   # flags first: a bad one fails before any work
    backend = resolve_backend(args.backend)
    sweep = _bench_sweep(args, backend)
    frontiers(sweep.ctx_start, sweep.ctx_max, sweep.step_incr)  # validate before any output
    for flag, path in (("--csv", args.csv), ("--plot", args.plot)):
        if path is not None:
            _check_output_path(path, flag)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'ds4nb[plot]'") from None
    text = _read_prompt_file(args.prompt_file) if args.prompt_file is not None else None
    model = _load_for_run(args.model)
    limit = model.config.context_length or None
    if limit is not None and sweep.ctx_max + sweep.gen_tokens > limit:
        raise UsageError(f"--ctx-max {sweep.ctx_max} + --gen-tokens {sweep.gen_tokens} exceeds the model's "
                         f"context length {limit}")
    tok = Tokenizer.from_gguf(model)
    if text is not None:
        tokens = tok.encode_ordinary(text)
    else:
        unit = tok.encode_ordinary(FILLER)
        tokens = unit * (sweep.ctx_max // len(unit) + 1)
    check_sequence(tokens, sweep.ctx_max)  # before the engine loads
    if backend == "cpu":
        _warn_line(_cpu_bench_note(args))
    with _bytes_progress("loading weights") as advance:
        engine, where = open_engine(model, backend, ctx=sweep.ctx_max + sweep.gen_tokens + 1,
                                    placement=placement, progress=advance)
    err_console.print(f"[dim]{_safe(model.name, 80)} | {where}[/dim]", highlight=False)
    table = Table(title="ds4nb bench", title_justify="left")
    for col in BenchRow.header():
        table.add_column(col, justify="right")
    rows: list[BenchRow] = []
    with _atomic_output(args.csv) as out:
        writer = csv.writer(out if out else sys.stdout)
        writer.writerow(BenchRow.header())
        for row in run_bench(engine, tokens, ctx_start=sweep.ctx_start, ctx_max=sweep.ctx_max,
                             step_incr=sweep.step_incr, gen_tokens=sweep.gen_tokens, eos_id=tok.eos_id):
            rows.append(row)
            writer.writerow([f"{v:.3f}" if isinstance(v, float) else v for v in row.values()])
            if out:
                out.flush()
                err_console.print(f"ctx {row.ctx_tokens}: prefill {row.prefill_tps:.1f} t/s, "
                                  f"gen {row.gen_tps:.2f} t/s", highlight=False)
    if args.csv:
        for row in rows:
            table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()])
        console.print(table)
    err_console.print(Text(engine.describe(), style="dim"))   # the decode path that ran
    if args.plot is not None:
        _plot(rows, args.plot, model.name)
    return 0


def _bench_sweep(args: argparse.Namespace, backend: str) -> Sweep:
    """The flags' sweep; flags left out take the backend's defaults (a small sweep on the slow cpu backend)."""
    import dataclasses

    from ds4nb.bench import CPU_SWEEP, GPU_SWEEP

    defaults = CPU_SWEEP if backend == "cpu" else GPU_SWEEP
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(defaults) if getattr(args, f.name) is not None}
    return dataclasses.replace(defaults, **given)


def _cpu_bench_note(args: argparse.Namespace) -> str:
    from ds4nb.bench import CPU_SWEEP as cpu

    note = "the cpu backend runs the numpy reference, some 25 tokens/s on the default model"
    if None in (args.ctx_start, args.ctx_max, args.step_incr, args.gen_tokens):
        note += (f"; flags left out take a small sweep (ctx {cpu.ctx_start} to {cpu.ctx_max} step {cpu.step_incr}, "
                 f"{cpu.gen_tokens} tokens)")
    return note


def _check_output_path(path: Path, flag: str) -> None:
    """Fail before any work if ``path`` cannot become an output file."""
    if path.is_dir():
        raise UsageError(f"{flag} {shown_path(path)} is a directory, expected a file name")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {shown_path(path)}: the directory {shown_path(parent)} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {shown_path(path)}: the directory {shown_path(parent)} is not writable")


@contextlib.contextmanager
def _atomic_output(path: Path | None, mode: str = "w") -> Iterator[IO | None]:
    """A file that appears at ``path`` only once complete (None: no file); a failure leaves nothing."""
    if path is None:
        yield None
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        fh = open(tmp, mode, **({} if "b" in mode else {"newline": ""}))
    except OSError as e:
        raise UsageError(f"cannot write {shown_path(path)}: {e.strerror or e}") from None
    try:
        with fh:
            yield fh
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise UsageError(f"cannot write {shown_path(path)}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [r.ctx_tokens for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ctx, [r.prefill_tps for r in rows], marker="o", label="prefill t/s")
    ax.plot(ctx, [r.gen_tps for r in rows], marker="o", label="generation t/s")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("tokens / s")
    ax.set_yscale("log")
    ax.set_title(shown(title, 80))
    ax.legend()
    fig.tight_layout()
    with _atomic_output(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# placement


# ---------------------------------------------------------------------------
# profile


def cmd_profile(args: argparse.Namespace) -> int:
    """Record how often the router picks each expert on a text: the usage profile ``--expert-usage`` reads."""
    import json

    import numpy as np

    from ds4nb.cache.usage import ExpertUsage
    from ds4nb.engine.backends import resolve_backend
    from ds4nb.engine.session import CudaEngine
    from ds4nb.sampling import GREEDY
    from ds4nb.tokenizer import Tokenizer

    placement = _placement_options(args)
    _check_output_path(args.out, "-o")
    text = _read_prompt_file(args.prompt_file)
    if resolve_backend("auto") != "cuda":
        raise UsageError("ds4nb profile counts expert picks on the GPU: no CUDA GPU is available")
    model = _load_for_run(args.model)
    tokens = Tokenizer.from_gguf(model).encode_ordinary(text)
    if not tokens:
        raise UsageError(f"{shown_path(args.prompt_file)} holds no text to profile")
    ctx = len(tokens) + args.gen + 1
    with _bytes_progress("loading weights") as advance:
        engine = CudaEngine(model, ctx=ctx, placement=placement, progress=advance, count_experts=True)
    with _PrefillProgress() as on_progress:
        for start in range(0, len(tokens), engine.chunk):
            logits = engine.prefill(tokens[start:start + engine.chunk])
            on_progress(min(start + engine.chunk, len(tokens)), len(tokens))
    for _ in engine.decode_chain(int(logits.argmax()), GREEDY, np.random.default_rng(0), args.gen):
        pass
    counts = engine.expert_counts()
    usage = ExpertUsage(model.name, tuple(tuple(int(c) for c in row) for row in counts))
    with _atomic_output(args.out) as fh:
        fh.write(json.dumps(usage.to_json()) + "\n")
    picks = int(counts.sum())
    err_console.print(Text(f"{len(tokens) + args.gen} tokens, {picks} expert picks over {counts.shape[0]} layers "
                           f"-> {shown_path(args.out)}", style="dim"))
    return 0


def _add_placement_args(p: argparse.ArgumentParser) -> None:
    """--placement, --gpu-budget, --expert-usage (generate, bench, placement)."""
    p.add_argument("--placement", metavar="NAME[:ARG]", default=None,
                   help="where weights live: full, partial, direct or a plugin's policy (env DS4NB_PLACEMENT; "
                        "default: full when the model fits the GPU, else partial)")
    p.add_argument("--gpu-budget", metavar="SIZE", default=None,
                   help="most weight bytes in GPU memory: 24G (= 24GiB), 24GB, 512M, or 70%% of the device's "
                        "memory (env DS4NB_GPU_BUDGET)")
    p.add_argument("--expert-usage", type=Path, metavar="FILE", default=None,
                   help="routing profile JSON: partial keeps the most used routed experts on the GPU")


def _placement_options(args: argparse.Namespace) -> PlacementOptions:
    """The placement options of a command, from its flags and the environment (parsed once); a policy name no
    plugin provides fails here, before any work (also when the run ends up on the CPU, which has no placement)."""
    from ds4nb.cache.choose import known_policy
    from ds4nb.cache.options import PlacementOptions
    from ds4nb.plugins import placement_policies

    options = PlacementOptions.from_cli(args.placement, args.gpu_budget, args.expert_usage)
    if options.policy is not None:
        known_policy(options.policy, placement_policies())
    return options


def _size(text: str) -> int:
    from ds4nb.cache.options import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _gbps(text: str) -> float:
    v = _float(text)
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive bandwidth in GB/s, got {text!r}")
    return v * 1e9


def _fmt_size(n: float) -> str:
    """Bytes for a table: B, KiB, MiB with two decimals, GiB from 1 GiB."""
    if n < 2**10:
        return f"{n:.0f} B"
    if n < 2**20:
        return f"{n / 2**10:.2f} KiB"
    return format_bytes(int(n))


ASSUMED_DEVICE_MEMORY = 80 << 30  # an H100's, like the assumed bandwidths


def _placement_target(args: argparse.Namespace):
    """(device memory, its note, HBM read B/s, host read B/s, their notes) for ``ds4nb placement``."""
    from ds4nb.cache.plan import DeviceMemory
    from ds4nb.dispatch.device import ASSUMED_READ_BANDWIDTH, probe_device, read_bandwidth
    from ds4nb.engine.backends import cuda_available

    gpu = cuda_available()
    probe = probe_device() if gpu else None
    if args.device_memory is not None:
        size = args.device_memory
        device = DeviceMemory(f"{format_bytes(size)} GPU", size, size)
        note = "given"
    elif probe is not None:
        device = DeviceMemory(probe.name, probe.total_bytes, probe.free_bytes)
        note = f"{format_bytes(probe.free_bytes)} free of {format_bytes(probe.total_bytes)}"
    else:
        size = ASSUMED_DEVICE_MEMORY
        device = DeviceMemory(f"{format_bytes(size)} GPU", size, size)
        note = "assumed: no GPU here; --device-memory to change"
    if args.device_bw is not None and args.host_bw is not None:
        return device, note, (args.device_bw, "given"), (args.host_bw, "given")
    bw = ASSUMED_READ_BANDWIDTH
    if probe is not None:
        bw = read_bandwidth(probe, on_measure=lambda: err_console.print(
            f"[dim]measuring the read bandwidth of {probe.name} (once; cached)[/dim]", highlight=False))
    dev = (args.device_bw, "given") if args.device_bw is not None else (bw.device, bw.source)
    host = (args.host_bw, "given") if args.host_bw is not None else (bw.host, bw.source)
    return device, note, dev, host


def cmd_placement(args: argparse.Namespace) -> int:
    from ds4nb.cache.choose import choose_placement, placement_request
    from ds4nb.cache.plan import engine_tensors
    from ds4nb.cache.roofline import role_costs, roofline
    from ds4nb.plugins import placement_policies

    options = _placement_options(args)
    model = _load_for_run(args.model)
    device, device_note, (dev_bw, dev_src), (host_bw, host_src) = _placement_target(args)
    tensors = engine_tensors(model)
    if args.reserve is None:             # what the CUDA engine keeps for a session of --ctx tokens
        from ds4nb.engine.model import prefill_chunk, session_bytes

        ctx = args.ctx or min(32768, model.config.context_length or 32768)
        args.reserve = session_bytes(model.config, ctx, prefill_chunk(model.config, ctx, device.total_bytes))
    plan = choose_placement(tensors, device, options, reserve_bytes=args.reserve, policies=placement_policies())
    weight_budget = placement_request(tensors, device, options, reserve_bytes=args.reserve).weight_budget
    k, usage = model.config.n_expert_used, options.expert_usage
    roof = roofline(plan, tensors, k, device_bw=dev_bw, host_bw=host_bw, usage=usage)

    rows = [("model", f"{model.name} ({model.path})"),
            ("device", f"{device.name} ({device_note}); {format_bytes(args.reserve)} kept for KV cache and "
                       f"activations (--reserve)")]
    source = f"--gpu-budget {options.gpu_budget.text}" if options.gpu_budget else "free memory less the reserve"
    rows.append(("weight budget", f"{format_bytes(weight_budget)} ({source})"))
    how = "" if options.policy else (" (default: the model fits)" if plan.policy == "full" else
                                     " (default: the model does not fit the budget)")
    rows.append(("placement", f"{plan.policy}{how}: {format_bytes(plan.device_bytes)} on the GPU, "
                              f"{format_bytes(plan.mapped_bytes)} host-mapped"))
    if usage is not None:
        rows.append(("expert usage", f"{usage.source} (recorded on {usage.model})"))
    rows += [
        ("routed experts", _experts_on_gpu(plan, tensors)),
        ("GPU reads", f"{_fmt_size(roof.per_token.device)}/token at {dev_bw / 1e9:.0f} GB/s ({dev_src}): "
                      f"{roof.device_seconds * 1e3:.3f} ms"),
        ("host reads", f"{_fmt_size(roof.per_token.host)}/token at {host_bw / 1e9:.1f} GB/s ({host_src}): "
                       f"{roof.host_seconds * 1e3:.3f} ms"),
        ("decode roofline", f"{roof.tokens_per_second:.1f} tokens/s (weights read once per token, GPU then host)"),
    ]
    for key, value in rows:
        console.print(f"[cyan]{key:<16}[/cyan]{escape(value)}", highlight=False, soft_wrap=True)

    rt = Table(title="bytes by role: held, and read per token", title_justify="left")
    for col, just in (("role", "left"), ("tensors", "right"), ("on GPU", "right"), ("on host", "right"),
                      ("GPU/token", "right"), ("host/token", "right")):
        rt.add_column(col, justify=just, no_wrap=True)
    costs = role_costs(plan, tensors, k, usage)
    for r in costs:
        rt.add_row(r.role, str(r.tensors), _fmt_size(r.held.device), _fmt_size(r.held.host),
                   _fmt_size(r.per_token.device), _fmt_size(r.per_token.host))
    rt.add_section()
    rt.add_row("total", str(len(tensors)), _fmt_size(plan.device_bytes), _fmt_size(plan.mapped_bytes),
               _fmt_size(roof.per_token.device), _fmt_size(roof.per_token.host), style="bold")
    console.print(rt)
    return 0


def _experts_on_gpu(plan, tensors) -> str:
    """How many (layer, expert) have all their routed-expert slices on the GPU, in total and per layer."""
    from ds4nb.cache.plan import expert_count

    per_layer: dict[int, frozenset[int]] = {}
    n_per_layer: dict[int, int] = {}
    for info in tensors:
        n = expert_count(info)
        if n is None or info.layer is None:
            continue
        ids = plan.device_experts(info)
        per_layer[info.layer] = per_layer.get(info.layer, ids) & ids
        n_per_layer[info.layer] = n
    on = sum(len(ids) for ids in per_layer.values())
    layers = " ".join(str(len(per_layer[il])) for il in sorted(per_layer))
    return f"{on} of {sum(n_per_layer.values())} on the GPU (per layer: {layers})"


# ---------------------------------------------------------------------------
# dispatch


def cmd_dispatch(args: argparse.Namespace) -> int:
    """Time the Q8_0 matmul strategies on this GPU for a model's shapes (or show the cached timings) and the choice."""
    from ds4nb.dispatch.device import probe_device
    from ds4nb.dispatch.select import ENV_VAR, REGIMES, STRATEGIES, dispatch_cache_path, requested_strategy
    from ds4nb.engine.backends import cuda_available
    from ds4nb.engine.q8_timing import dispatch_key, q8_dispatch

    forced = requested_strategy()
    if not cuda_available():
        raise UsageError("ds4nb dispatch times the Q8_0 matmul strategies on a CUDA GPU: none is available here "
                         "(the cpu backend needs no dispatch)")
    if args.model is not None:
        from ds4nb.model import load_model

        model = load_model(args.model)
        cfg, what = model.config, model.name
    else:
        from ds4nb.model.presets import flash_config

        cfg, what = flash_config(), "the flash preset"
    probe = probe_device()
    decision = q8_dispatch(cfg, probe, remeasure=args.remeasure, env={}, on_measure=lambda: err_console.print(
        f"[dim]timing the Q8_0 strategies on {_safe(probe.name)} (once; cached)[/dim]", highlight=False))
    key = dispatch_key(cfg, probe)
    t = Table()
    t.add_column("strategy")
    for regime in REGIMES:
        t.add_column(f"{regime} token" + ("s" if regime > 1 else ""), justify="right")
    chosen = dict(decision.choices)
    for strategy in STRATEGIES:
        cells = []
        for regime in REGIMES:
            sec = decision.seconds(strategy, regime)
            if sec is None:
                cells.append("-")
                continue
            mark = "*" if chosen[regime] == strategy else " "
            cells.append(f"{sec * 1e3:.3f} ms {key.flops(regime) / sec / 1e12:6.1f}{mark}")
        ran = any(c != "-" for c in cells)
        t.add_row(strategy if ran else f"{strategy} (not run)", *cells)
    if decision.timings:
        console.print(Text(f"the {len(key.shapes)} Q8_0 matmuls of one layer of {shown(what, 80)} on "
                           f"{shown(probe.name)}: ms, TFLOP/s (* = chosen)"))
        console.print(t)
    console.print(Text(f"choice: {decision.describe()}"))
    if forced != "auto":
        console.print(Text(f"in effect ({ENV_VAR}): {q8_dispatch(cfg, probe, measure=False).describe()}"))
    console.print(Text(f"cache: {dispatch_cache_path()}"))
    return 0


# ---------------------------------------------------------------------------
# plugins


def cmd_plugins(args: argparse.Namespace) -> int:
    from ds4nb.plugins import get_registry, placement_policies, plugin_infos

    pt = Table(title="plugins", title_justify="left")
    for col in ("plugin", "version", "hooks"):
        pt.add_column(col)
    for info in plugin_infos():
        pt.add_row(info.name, info.version, ", ".join(info.hooks) or "(none)")
    console.print(pt)

    pol = Table(title="placement policies", title_justify="left")
    for col in ("policy", "provider", "what it does"):
        pol.add_column(col)
    for p in placement_policies().values():
        pol.add_row(p.name, p.provider, p.summary)
    console.print(pol)

    kt = Table(title="kernels", title_justify="left")
    for col, just in (("op", "left"), ("implementation", "left"), ("priority", "right"), ("provider", "left")):
        kt.add_column(col, justify=just)
    reg = get_registry()
    for op in reg.ops():
        for impl in reg.implementations(op):
            kt.add_row(op, impl.name, str(impl.priority), impl.provider)
    console.print(kt)
    return 0


# ---------------------------------------------------------------------------
# parser


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


def _non_negative_int(text: str) -> int:
    return _seed(text)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ds4nb", description="DeepSeek V4 Flash (DS4) GGUF inference with Numba-CUDA kernels.")
    p.add_argument("--version", action="version", version=f"ds4nb {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    info = sub.add_parser("info", help="show a DS4 GGUF's configuration and tensor catalog")
    info.add_argument("model", type=Path, metavar="MODEL", help="path to a DS4 GGUF file")
    info.set_defaults(func=cmd_info)

    kern = sub.add_parser("kernels", help="list the kernel registry (op, implementation, layout, needs, provider)")
    kern.set_defaults(func=cmd_kernels)

    synth = sub.add_parser("synth", help="write a synthetic DS4 GGUF (random weights, real layout)")
    synth.add_argument("out", type=Path, metavar="OUT.gguf", help="output path (written atomically)")
    synth.add_argument("--preset", choices=("tiny", "small", "flash"), default="tiny",
                       help="tiny: simulator-sized; small: the embedded default; flash: the real ~80 GiB shape")
    synth.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    synth.add_argument("--quant", choices=("q2", "q4"), default="q2",
                       help="routed experts: q2 = IQ2_XXS gate/up + Q2_K down (default), q4 = Q4_K")
    synth.add_argument("--layers", type=_positive_int, default=None,
                       help="number of layers (default: the preset's; e.g. a flash-shaped model that fits a GPU)")
    synth.add_argument("--workers", type=_positive_int, default=None, help="writer processes (default: all cores)")
    synth.set_defaults(func=cmd_synth)

    from ds4nb.bench import CPU_SWEEP, GPU_SWEEP
    from ds4nb.chat import DEFAULT_SYSTEM_PROMPT
    from ds4nb.engine.backends import BACKENDS
    from ds4nb.sampling import SamplingParams

    d = SamplingParams()
    gen = sub.add_parser("generate", help="generate text from a prompt (streams tokens, prints stats)")
    gen.add_argument("-m", "--model", type=Path, default=None,
                     help="DS4 GGUF file (default: the embedded small synthetic model)")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", default="Hello! Who are you?", help="the user prompt")
    src.add_argument("--prompt-file", type=Path, default=None, help="read the user prompt from a file")
    gen.add_argument("-n", "--tokens", dest="n", type=_positive_int, default=256,
                     help="most tokens to generate (default 256)")
    gen.add_argument("--ctx", type=_positive_int, default=None,
                     help=f"context size in tokens (default {DEFAULT_CTX}, or the model's if smaller)")
    gen.add_argument("--temp", type=_float, default=d.temperature,
                     help=f"temperature, 0 = greedy (default {d.temperature:g})")
    gen.add_argument("--top-k", type=_non_negative_int, default=d.top_k, help=f"top-k, 0 = off (default {d.top_k})")
    gen.add_argument("--top-p", type=_float, default=d.top_p, help=f"top-p (default {d.top_p:g})")
    gen.add_argument("--min-p", type=_float, default=d.min_p, help=f"min-p (default {d.min_p:g})")
    gen.add_argument("--seed", type=_seed, default=None, help="sampling seed (default: random)")
    think = gen.add_mutually_exclusive_group()
    think.add_argument("--nothink", action="store_true", help="answer without a thinking section")
    think.add_argument("--think", choices=("high", "max"), default="high",
                       help="thinking mode (max needs --ctx >= 393216; default high)")
    gen.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system prompt ('' for none)")
    gen.add_argument("--backend", choices=BACKENDS, default="auto", help="auto (default): cuda if a GPU, else cpu")
    _add_placement_args(gen)
    gen.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="prefill and generation tokens/s at context frontiers (CSV)")
    b.add_argument("-m", "--model", type=Path, default=None, help="DS4 GGUF file (default: the embedded model)")
    b.add_argument("--ctx-start", type=_positive_int, default=None,
                   help=f"first frontier (default {GPU_SWEEP.ctx_start}; cpu backend {CPU_SWEEP.ctx_start})")
    b.add_argument("--ctx-max", type=_positive_int, default=None,
                   help=f"last frontier (default {GPU_SWEEP.ctx_max}; cpu backend {CPU_SWEEP.ctx_max})")
    b.add_argument("--step-incr", type=_positive_int, default=None,
                   help=f"frontier step (default {GPU_SWEEP.step_incr}; cpu backend {CPU_SWEEP.step_incr})")
    b.add_argument("--gen-tokens", type=_positive_int, default=None,
                   help=f"greedy tokens per frontier (default {GPU_SWEEP.gen_tokens}; cpu backend "
                        f"{CPU_SWEEP.gen_tokens})")
    b.add_argument("--prompt-file", type=Path, default=None, help="benchmark text (default: built-in filler)")
    b.add_argument("--csv", type=Path, default=None, help="write the CSV here (default: stdout)")
    b.add_argument("--plot", type=Path, default=None, help="write a PNG of t/s vs context (needs matplotlib)")
    b.add_argument("--backend", choices=BACKENDS, default="auto", help="auto (default): cuda if a GPU, else cpu")
    _add_placement_args(b)
    b.set_defaults(func=cmd_bench)

    _add_placement_parser(sub)
    dis = sub.add_parser("dispatch", help="time the Q8_0 matmul strategies on this GPU per batch size, and show "
                                          "the choice (measured once per GPU and model; cached)")
    dis.add_argument("-m", "--model", type=Path, default=None,
                     help="DS4 GGUF file whose shapes to time (default: the real flash model's)")
    dis.add_argument("--remeasure", action="store_true", help="measure again even if a choice is cached")
    dis.set_defaults(func=cmd_dispatch)
    plug = sub.add_parser("plugins", help="list plugins, placement policies and kernels with their providers")
    plug.set_defaults(func=cmd_plugins)
    return p


def _add_placement_parser(sub) -> None:
    prof = sub.add_parser("profile", help="record which routed experts a text uses (for --expert-usage)")
    prof.add_argument("-m", "--model", type=Path, default=None, help="DS4 GGUF file (default: the embedded model)")
    prof.add_argument("--prompt-file", type=Path, required=True, help="the text to run through the model")
    prof.add_argument("-o", "--out", type=Path, required=True, help="the usage profile JSON to write")
    prof.add_argument("--gen", type=_non_negative_int, default=0, help="greedy tokens to generate after the text")
    _add_placement_args(prof)
    prof.set_defaults(func=cmd_profile)

    pl = sub.add_parser("placement", help="show where each weight would live and the decode roofline it implies "
                                          "(loads no weights)")
    pl.add_argument("-m", "--model", type=Path, default=None, help="DS4 GGUF file (default: the embedded model)")
    _add_placement_args(pl)
    pl.add_argument("--ctx", type=_positive_int, default=None,
                    help="context the session is for (default 32768, or the model's if smaller)")
    pl.add_argument("--reserve", type=_size, default=None, metavar="SIZE",
                    help="GPU memory kept for KV cache and activations (default: what the engine needs for --ctx)")
    pl.add_argument("--device-memory", type=_size, default=None, metavar="SIZE",
                    help="plan for a GPU with this much free memory (default: this machine's GPU, else 80G)")
    pl.add_argument("--device-bw", type=_gbps, default=None, metavar="GB/s",
                    help="GPU memory read bandwidth (default: measured once per GPU and cached; without a GPU "
                         "2706, an H100's)")
    pl.add_argument("--host-bw", type=_gbps, default=None, metavar="GB/s",
                    help="host-mapped memory read bandwidth over PCIe (default: measured and cached; without a "
                         "GPU 50.7, an H100's)")
    pl.set_defaults(func=cmd_placement)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args = parser.parse_args(argv)
            if not getattr(args, "func", None):
                parser.print_help()
                return 2
            return int(args.func(args) or 0)
    except Ds4Error as e:
        _error_line(str(e))
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 0


def _error_line(message: str) -> None:
    err_console.print(Text.assemble(("error:", "bold red"), " ", shown(message, ERROR_LIMIT)), soft_wrap=True)


def _warn_line(message: str) -> None:
    err_console.print(Text.assemble(("warning:", "yellow"), " ", shown(message, ERROR_LIMIT)), soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """``warnings.showwarning`` for the CLI: one ``warning:`` line, no source location."""
    _warn_line(str(message))


def _silence_stdout() -> None:
    """The reader of stdout went away (``| head``): send what is still buffered, and the
    interpreter's flush at exit, to /dev/null instead of raising again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (tests capture it)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
