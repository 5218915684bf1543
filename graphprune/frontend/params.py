"""Read and replace a traced model's parameters and buffers by their dotted path."""

from __future__ import annotations

import torch
from torch import nn


def get_tensor(gm: nn.Module, path: str) -> torch.Tensor:
    owner, _, attr = path.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def set_tensor(gm: nn.Module, path: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer, keeping its kind and requires_grad."""
    owner_path, _, attr = path.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value.detach(), old.requires_grad))
    else:
        owner.register_buffer(
            attr, value.detach().clone(), persistent=attr not in owner._non_persistent_buffers_set
        )
