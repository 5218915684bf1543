"""The ResRep compactor: a 1x1 convolution C -> C, initialized to the identity.

It is an ``nn.Conv2d`` so every channel rule, exporter and runner already understands it.
Its buffers say which channel of which group each row controls, and hold the current mask
(1 = the row learns from the task loss, 0 = it only decays), so masks live in state_dict.
"""

from __future__ import annotations

import torch
from torch import nn


class Compactor(nn.Conv2d):
    graphprune_leaf = True  # trace() keeps it as one call_module node
    graphprune_equivalent = nn.Conv2d  # a plain 1x1 conv: the Conv2d rule applies

    def __init__(self, channels: int, group: int = -1, channel_index: torch.Tensor | None = None):
        super().__init__(channels, channels, kernel_size=1, bias=False)
        with torch.no_grad():
            self.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        self.group = group
        index = torch.arange(channels) if channel_index is None else channel_index.long()
        self.register_buffer("channel_index", index.clone())
        self.register_buffer("mask", torch.ones(channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, group={self.group}"

    @property
    def matrix(self) -> torch.Tensor:
        """The C x C matrix Q (a view of the weight)."""
        return self.weight.view(self.out_channels, self.in_channels)
