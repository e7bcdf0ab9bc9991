"""Running ``ds4nb`` in-process for CLI tests, and the one-line error every bad input must give."""

from __future__ import annotations

from ds4nb.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``ds4nb *argv``."""
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line_error(code: int, err: str, *needles: str) -> str:
    """The single ``error: ...`` line of a refused command (exit 2), containing every needle."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
