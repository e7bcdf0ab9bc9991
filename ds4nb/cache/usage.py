"""Expert usage profiles: how often the router picked each routed expert.

A profile is a JSON file (``--expert-usage usage.json``)::

    {
      "version": 1,
      "model": "DeepSeek-V4-Flash",
      "layers": {
        "0": [812, 0, 95, ...],
        "1": [...]
      }
    }

``version`` (optional, 1) is the schema version; ``model`` names the model
the profile was recorded on (shown, not enforced: expert routing does not
depend on the quantization); ``layers`` maps every layer index (a decimal
string) to one count per routed expert: how many tokens selected that expert
in that layer.  Each token selects ``n_expert_used`` distinct experts per
layer, so the share of tokens that read expert ``e`` is
``n_expert_used * count[e] / sum(count)``.  No other keys are allowed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds4nb.errors import Ds4Error

VERSION = 1
KEYS = ("version", "model", "layers")
_LAYER_KEY = re.compile(r"0|[1-9][0-9]*")


@dataclass(frozen=True)
class ExpertUsage:
    """Routing counts per layer and expert: ``counts[layer][expert]``."""

    model: str
    counts: tuple[tuple[int, ...], ...]
    source: str = field(default="expert usage", compare=False)  # where it came from, for messages

    @property
    def n_layer(self) -> int:
        return len(self.counts)

    def share(self, layer: int, expert: int) -> float:
        """This expert's share of the layer's routing events (0 when the layer saw none)."""
        total = sum(self.counts[layer])
        return self.counts[layer][expert] / total if total else 0.0

    def token_fractions(self, layer: int, n_expert_used: int) -> tuple[float, ...]:
        """Expected fraction of tokens that read each expert of ``layer`` (uniform when no counts)."""
        row = self.counts[layer]
        total = sum(row)
        if not total:
            return (min(n_expert_used / len(row), 1.0),) * len(row)
        return tuple(min(n_expert_used * c / total, 1.0) for c in row)

    def check(self, experts_per_layer: Mapping[int, int]) -> None:
        """One-line error unless the profile has exactly these layers and expert counts."""
        want = sorted(experts_per_layer)
        if list(range(self.n_layer)) != want:
            raise Ds4Error(f"{self.source}: has {self.n_layer} layers, the model has {len(want)}")
        for layer, n in experts_per_layer.items():
            if len(self.counts[layer]) != n:
                raise Ds4Error(f"{self.source}: layer {layer} has {len(self.counts[layer])} counts, "
                               f"the model has {n} experts")

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "model": self.model,
                "layers": {str(il): list(row) for il, row in enumerate(self.counts)}}

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_json()) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExpertUsage:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise Ds4Error(f"cannot read the expert usage file {source}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise Ds4Error(f"{source}: not a UTF-8 JSON file") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise Ds4Error(f"{source}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return cls.from_json(obj, source)

    @classmethod
    def from_json(cls, obj: Any, source: str = "expert usage") -> ExpertUsage:
        """Validate a decoded profile (see the module docstring); one-line errors."""
        if not isinstance(obj, dict):
            raise Ds4Error(f"{source}: expected a JSON object with keys model and layers")
        extra = sorted(set(obj) - set(KEYS))
        if extra:
            raise Ds4Error(f"{source}: unknown key {extra[0]!r} (expected {', '.join(KEYS)})")
        version = obj.get("version", VERSION)
        if version != VERSION or isinstance(version, bool):
            raise Ds4Error(f"{source}: version is {version!r}, this ds4nb reads version {VERSION}")
        model = obj.get("model")
        if not isinstance(model, str):
            raise Ds4Error(f"{source}: 'model' must be a string (the model's name)")
        layers = obj.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise Ds4Error(f"{source}: 'layers' must be an object mapping each layer index to its expert counts")
        by_index: dict[int, tuple[int, ...]] = {}
        for key, row in layers.items():
            if not _LAYER_KEY.fullmatch(key):
                raise Ds4Error(f"{source}: layer key {key!r} is not a layer index")
            by_index[int(key)] = _counts(row, f"{source}: layers.{key}")
        if sorted(by_index) != list(range(len(by_index))):
            gap = min(set(range(len(by_index))) - set(by_index))
            raise Ds4Error(f"{source}: layer {gap} is missing (layers must be 0..{len(by_index) - 1})")
        return cls(model, tuple(by_index[il] for il in range(len(by_index))), source)


def _counts(row: Any, where: str) -> tuple[int, ...]:
    if not isinstance(row, list) or not row:
        raise Ds4Error(f"{where} must be a non-empty list of counts, one per expert")
    for i, c in enumerate(row):
        if not isinstance(c, int) or isinstance(c, bool) or c < 0:
            raise Ds4Error(f"{where}[{i}] is {c!r}, expected a non-negative integer")
    return tuple(row)
