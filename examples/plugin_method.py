"""A pruning method as a plugin: the "add a method" recipe of docs/ARCHITECTURE.md.

``keep-first`` keeps the first channels of every group (``--last``: the last ones). The channel
index is a toy importance, but the method is complete: compress(), ``graphprune methods`` and
``graphprune compress --method keep-first --last`` all pick it up from the registry, with
nothing else changed. Run it from the command line with this folder on the import path:

    PYTHONPATH=examples graphprune --plugin plugin_method methods
    PYTHONPATH=examples graphprune --plugin plugin_method compress resnet20 --method keep-first
    GRAPHPRUNE_PLUGINS=plugin_method PYTHONPATH=examples graphprune compress ...   # the same

or from Python: ``import plugin_method`` and then ``graphprune.compress(model, "keep-first",
example_inputs=(x,), flops_target=0.5, last=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphprune.methods import Method, MethodConfig, option, register_method


@dataclass(frozen=True, slots=True, kw_only=True)
class KeepFirstConfig(MethodConfig):
    """flops_target and round_to come from MethodConfig; each field below becomes a flag."""

    last: bool = option(False, "keep each group's last channels instead of its first")


@register_method
class KeepFirst(Method):
    """Keep each group's first channels: the channel index as a (toy) importance."""

    name = "keep-first"
    config_class = KeepFirstConfig
    config: KeepFirstConfig

    def scores(self) -> dict[int, np.ndarray]:
        # Higher is kept. The base class plans globally to the MACs target and prunes.
        sign = 1.0 if self.config.last else -1.0
        return {g.id: sign * np.arange(g.channels, dtype=float) for g in self.prunable_groups}
