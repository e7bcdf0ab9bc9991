"""The numpy DS4 oracle: the forward pass of the reference CPU path (docs/model.md).

* :mod:`ds4nb.reference.ops`: the math as small pure functions;
* :mod:`ds4nb.reference.model`: :class:`Reference`, the forward pass;
* :mod:`ds4nb.reference.state`: :class:`State`, what a session carries;
* :mod:`ds4nb.reference.engine`: the :class:`Engine` interface and :class:`CpuEngine`.
"""

from ds4nb.reference.engine import CpuEngine, Engine
from ds4nb.reference.model import Reference
from ds4nb.reference.state import CompressorState, LayerState, State

__all__ = ["CompressorState", "CpuEngine", "Engine", "LayerState", "Reference", "State"]
