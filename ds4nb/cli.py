"""The ``ds4nb`` command line.

Each subcommand is a small function; user errors (:class:`Ds4Error`) become one
red line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from ds4nb import __version__
from ds4nb.errors import Ds4Error, UsageError

console = Console()
err_console = Console(stderr=True)


# ---------------------------------------------------------------------------
# info


def cmd_info(args: argparse.Namespace) -> int:
    from ds4nb.model import load_model

    model = load_model(args.model)
    cfg = model.config
    title = f"{model.name}  [dim]({model.path}, {model.kind} file)[/dim]"
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
    return 0


def format_bytes(n: int) -> str:
    """GiB with two decimals for model-sized numbers, MiB below 1 GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


# ---------------------------------------------------------------------------
# synth


def cmd_synth(args: argparse.Namespace) -> int:
    from ds4nb.model.synth import describe, write_synthetic

    with _bytes_progress(f"writing {args.out.name}") as advance:
        t0 = time.perf_counter()
        plan = write_synthetic(args.out, args.preset, seed=args.seed, quant=args.quant, n_layer=args.layers,
                               workers=args.workers, progress=advance)
        dt = time.perf_counter() - t0
    console.print(f"[green]wrote[/green] {args.out}: {args.preset} preset, {describe(plan, dt)}")
    return 0


class _bytes_progress:
    """Context manager yielding a ``progress(done, total)`` callback drawing a rich bar."""

    def __init__(self, label: str) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=err_console,
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except Ds4Error as e:
        err_console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
