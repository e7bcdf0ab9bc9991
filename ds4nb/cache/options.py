"""The user's placement choice, parsed once from flags and environment.

``--placement NAME[:ARG]`` (env ``DS4NB_PLACEMENT``) picks a policy;
without one, ds4nb places everything on the GPU when it fits (``full``) and
a prioritized subset otherwise (``partial``).  ``--gpu-budget SIZE`` (env
``DS4NB_GPU_BUDGET``) caps the weight bytes on the GPU; ``--expert-usage
FILE`` gives a routing profile.  A flag beats its environment variable.

Sizes: a number of bytes with an optional unit, or a share of the device's
total memory.  ``K``/``M``/``G``/``T`` and ``KiB``/``MiB``/``GiB``/``TiB`` are
binary (``24G`` = ``24GiB`` = 24 * 2**30 bytes), ``KB``/``MB``/``GB``/``TB``
decimal (``24GB`` = 24 * 10**9), units are case-insensitive, fractions are
allowed (``1.5G``); ``70%`` is 70 % of the device's total memory.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ds4nb.cache.usage import ExpertUsage
from ds4nb.errors import UsageError

ENV_PLACEMENT = "DS4NB_PLACEMENT"
ENV_GPU_BUDGET = "DS4NB_GPU_BUDGET"

_UNITS = {"": 1, "b": 1,
          "k": 2**10, "kib": 2**10, "kb": 10**3,
          "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9,
          "t": 2**40, "tib": 2**40, "tb": 10**12}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
_SHARE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*")
_POLICY = re.compile(r"[A-Za-z0-9_.-]+")


def parse_size(text: str) -> int:
    """Bytes of ``24G``, ``512MiB``, ``1.5GB``, ``1048576`` (see the module docstring); ValueError if malformed."""
    m = _SIZE.fullmatch(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError("not a size (e.g. 24G, 24GiB, 512M, 70%)")
    return math.floor(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class GpuBudget:
    """``--gpu-budget``: a byte count, or a share of the device's total memory."""

    text: str
    nbytes: int | None = None
    share: float | None = None   # in (0, 1]

    @classmethod
    def parse(cls, text: str, label: str | None = None) -> GpuBudget:
        """``label`` names the source in errors (default ``--gpu-budget TEXT``)."""
        label = label or f"--gpu-budget {text}"
        if m := _SHARE.fullmatch(text):
            pct = float(m.group(1))
            if not 0 < pct <= 100:
                raise UsageError(f"{label}: a share of device memory must be in (0%, 100%]")
            return cls(text.strip(), share=pct / 100)
        try:
            return cls(text.strip(), nbytes=parse_size(text))
        except ValueError as e:
            raise UsageError(f"{label}: {e}") from None

    def resolve(self, total_bytes: int) -> int:
        """The budget in bytes on a device with ``total_bytes`` of memory."""
        if self.nbytes is not None:
            return self.nbytes
        assert self.share is not None
        return math.floor(self.share * total_bytes)


@dataclass(frozen=True)
class PlacementOptions:
    """What the user asked for; the chooser (:func:`ds4nb.cache.choose.choose_placement`) resolves it on a device."""

    policy: str | None = None          # None: full when it fits, else partial
    policy_arg: str | None = None      # ARG of --placement NAME:ARG
    gpu_budget: GpuBudget | None = None
    expert_usage: ExpertUsage | None = None

    @classmethod
    def from_cli(cls, placement: str | None = None, gpu_budget: str | None = None,
                 expert_usage: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None) -> PlacementOptions:
        """Parse flags (``None``: not given), falling back to ``DS4NB_PLACEMENT``/``DS4NB_GPU_BUDGET``."""
        env = os.environ if env is None else env
        policy = arg = None
        spec, label = _flag_or_env(placement, "--placement", env, ENV_PLACEMENT)
        if spec is not None:
            policy, sep, rest = spec.strip().partition(":")
            if not _POLICY.fullmatch(policy) or (sep and not rest):
                raise UsageError(f"{label}: expected a policy name (e.g. full, partial, direct), "
                                 f"optionally NAME:ARG")
            arg = rest if sep else None
        text, label = _flag_or_env(gpu_budget, "--gpu-budget", env, ENV_GPU_BUDGET)
        budget = None if text is None else GpuBudget.parse(text, label)
        usage = None if expert_usage is None else ExpertUsage.load(Path(expert_usage))
        return cls(policy, arg, budget, usage)

    def describe(self) -> str:
        parts = [f"placement {self.policy or 'auto'}" + (f":{self.policy_arg}" if self.policy_arg else "")]
        if self.gpu_budget is not None:
            parts.append(f"gpu budget {self.gpu_budget.text}")
        if self.expert_usage is not None:
            parts.append(f"expert usage {self.expert_usage.source}")
        return ", ".join(parts)


def _flag_or_env(value: str | None, flag: str, env: Mapping[str, str], var: str) -> tuple[str | None, str]:
    """The flag's value, else the variable's (unset or blank: ``None``), and a label for errors."""
    if value is not None:
        return value, f"{flag} {value}"
    text = env.get(var, "").strip()
    return (text or None), f"{var}={text}"
