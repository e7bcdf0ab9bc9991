"""Hook specification for kernel plugins (added to ``ds4nb.plugins``' manager)."""

from __future__ import annotations

from ds4nb.plugins import hookspec


@hookspec
def ds4nb_register_kernels(registry) -> None:
    """Add kernel implementations (and, if new, op specs) to ``registry``.

    ``registry`` is a :class:`ds4nb.kernels.registry.KernelRegistry`. Call
    ``registry.define_op(OpSpec(...))`` for a new op and
    ``registry.register(op, name, fn, layout=..., requires=Requirements(...))``
    (or ``registry.add_module(module)`` for functions marked with
    ``@ds4nb.kernels.registry.implementation``) for each implementation.
    Every implementation of an op takes the op's calling convention (see the
    op's ``OpSpec.signature``) and writes into caller-provided outputs.
    """
