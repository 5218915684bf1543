"""cleanup: drop dead nodes and submodules nothing refers to any more."""

from __future__ import annotations

from torch import fx

from graphprune.passes.runner import PassResult, graph_pass


def _mutates(node: fx.Node) -> bool:
    """In-place calls (``x.relu_()``, ``operator.iadd``) matter even when their result is unused."""
    if node.is_impure():
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return (
        name.endswith("_")
        and not name.endswith("__")
        or name.startswith("i")
        and name
        in (
            "iadd",
            "isub",
            "imul",
            "itruediv",
        )
    )


@graph_pass(preserves_outputs=True)
def cleanup(gm: fx.GraphModule) -> PassResult:
    """Remove nodes whose results are unused and modules no node calls.

    Requires: nothing. Effects: same outputs, fewer nodes/submodules.
    """
    before_nodes = len(gm.graph.nodes)
    before_modules = len(list(gm.modules()))
    changed = gm.graph.eliminate_dead_code(is_impure_node=_mutates)
    gm.delete_all_unused_submodules()
    removed = (before_nodes - len(gm.graph.nodes), before_modules - len(list(gm.modules())))
    return PassResult(gm, changed or removed[1] > 0, {"nodes": removed[0], "modules": removed[1]})
