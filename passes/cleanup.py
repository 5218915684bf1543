"""cleanup: drop dead nodes and submodules nothing refers to any more."""

from __future__ import annotations

from torch import fx

from graphprune.pipeline import PassContext, PassResult


def cleanup(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove nodes whose results are unused and modules no node calls.

    Requires: nothing. Effects: same outputs, fewer nodes/submodules.
    """
    before_nodes = len(gm.graph.nodes)
    before_modules = len(list(gm.modules()))
    changed = gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    removed = (before_nodes - len(gm.graph.nodes), before_modules - len(list(gm.modules())))
    return PassResult(gm, changed or removed[1] > 0, {"nodes": removed[0], "modules": removed[1]})
