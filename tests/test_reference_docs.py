"""Derivation check: docs/model.md's numbered steps and the oracle point at each other.

* every step names the functions that implement it ("Implemented by: ..."),
  each of which exists and says "step N" in its docstring;
* every "docs/model.md step(s) N" in the oracle's docstrings refers to a
  step that exists;
* every ``ds4.c:LINE`` citation in the document is inside the reference file.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import ds4nb.reference as reference_pkg
from ds4nb.reference import engine, model, ops, state, weights

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "model.md").read_text()
MODULES = {"ops": ops, "Reference": model.Reference}
STEP_RE = re.compile(r"^### Step (\d+)\. (.+)$", re.M)
IMPL_RE = re.compile(r"^Implemented by: (.+)$", re.M)
REF_RE = re.compile(r"steps? (\d+)[a-z]?(?:\s*-\s*(\d+))?")


def steps() -> dict[int, str]:
    """step number -> the text of that step's section."""
    found = list(STEP_RE.finditer(DOC))
    out = {}
    for i, m in enumerate(found):
        end = found[i + 1].start() if i + 1 < len(found) else DOC.find("\n## ", m.end())
        out[int(m.group(1))] = DOC[m.start():end]
    return out


def step_numbers_in(text: str) -> set[int]:
    nums: set[int] = set()
    for m in REF_RE.finditer(text):
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        nums.update(range(a, b + 1))
    return nums


def resolve(name: str):
    owner, attr = name.split(".", 1)
    return getattr(MODULES[owner], attr)


def test_steps_are_numbered_consecutively() -> None:
    nums = sorted(steps())
    assert nums == list(range(1, len(nums) + 1)) and len(nums) >= 20


@pytest.mark.parametrize("n", sorted(steps()))
def test_each_step_names_its_implementation(n: int) -> None:
    section = steps()[n]
    impl = IMPL_RE.search(section)
    assert impl, f"step {n} has no 'Implemented by:' line"
    names = re.findall(r"`([\w.]+)`", impl.group(1))
    assert names, f"step {n}: no function names"
    for name in names:
        fn = resolve(name)
        doc = inspect.getdoc(fn) or ""
        assert "docs/model.md" in doc and n in step_numbers_in(doc), f"{name} does not cite step {n}"


def test_docstrings_cite_existing_steps() -> None:
    known = set(steps())
    cited: set[int] = set()
    for mod in (ops, model, state, weights, engine, reference_pkg):
        src = inspect.getsource(mod)
        for m in re.finditer(r"docs/model\.md,? (step[^\n]*)", src):
            nums = step_numbers_in(m.group(1).split(":")[0])
            assert nums <= known, f"{mod.__name__} cites unknown steps {nums - known}"
            cited |= nums
    assert cited == known


def test_citations_are_inside_ds4c() -> None:
    lines = [int(a) for a in re.findall(r"ds4\.c:(\d+)", DOC)]
    lines += [int(b) for b in re.findall(r"ds4\.c:\d+-(\d+)", DOC)]
    assert lines and all(0 < n <= 18404 for n in lines)
