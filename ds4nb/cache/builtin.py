"""The built-in placement plugin: ``full``, ``partial`` and ``direct``.

It answers the same ``ds4nb_placement_policies`` hook as third-party
plugins (:mod:`ds4nb.plugins` registers it first).
"""

from __future__ import annotations

from ds4nb.cache.policies import BUILTIN_POLICIES
from ds4nb.hooks import hookimpl


@hookimpl
def ds4nb_placement_policies():
    return BUILTIN_POLICIES
