"""ds4nb-rules: place DS4 weights by a rule file, like llama.cpp's ``--override-tensor``.

``ds4nb generate --placement rules:my.rules`` reads ``my.rules``::

    # REGEX            WHERE    (first match wins; Python re.search on the tensor name)
    ffn_(gate|up|down)_exps   host
    token_embd\\.weight        host
    default                   gpu

Each rule is a regular expression and ``gpu`` (GPU memory) or ``host``
(page-locked host memory the kernels read over PCIe).  A tensor takes the
target of the first rule whose regex matches anywhere in its name, else the
``default`` (``gpu`` when the file has no default line).  Blank lines and
lines starting with ``#`` are ignored.  ds4nb checks the plan against the GPU
budget like any policy's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ds4nb.cache.plan import PlacementPlan, PlacementRequest
from ds4nb.errors import Ds4Error
from ds4nb.hooks import hookimpl

TARGETS = {"gpu": "device", "host": "mapped"}


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    target: str        # "device" or "mapped"
    line: int


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    default: str       # "device" or "mapped"

    def place(self, name: str) -> str:
        return next((r.target for r in self.rules if r.pattern.search(name)), self.default)


def parse_rules(text: str, source: str = "rules") -> RuleSet:
    """Parse a rule file; a bad line is a one-line :class:`Ds4Error` naming ``source:line``."""
    rules: list[Rule] = []
    default = None
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise Ds4Error(f"{source}:{no}: expected 'REGEX gpu|host' or 'default gpu|host', got {line!r}")
        pattern, where = parts
        target = TARGETS.get(where.lower())
        if target is None:
            raise Ds4Error(f"{source}:{no}: expected gpu or host, got {where!r}")
        if pattern == "default":
            if default is not None:
                raise Ds4Error(f"{source}:{no}: a second default line")
            default = target
            continue
        try:
            rules.append(Rule(re.compile(pattern), target, no))
        except re.error as e:
            raise Ds4Error(f"{source}:{no}: bad regex {pattern!r}: {e}") from None
    return RuleSet(tuple(rules), default or "device")


class RulesPolicy:
    """Tensors placed by a rule file (--placement rules:FILE): regex -> gpu|host, first match wins."""

    name = "rules"
    takes_arg = True

    def plan(self, request: PlacementRequest) -> PlacementPlan:
        if not request.policy_arg:
            raise Ds4Error("the 'rules' placement needs a rule file: --placement rules:FILE")
        path = Path(request.policy_arg)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise Ds4Error(f"cannot read the rule file {path}: {e.strerror}") from None
        rules = parse_rules(text, str(path))
        return PlacementPlan.build(self.name, request.catalog, {t.name: rules.place(t.name) for t in request.catalog})


@hookimpl
def ds4nb_placement_policies():
    return [RulesPolicy()]
