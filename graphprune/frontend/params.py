"""Read and replace a traced model's parameters and buffers by their dotted path.

A tensor may live under several paths (tied weights: two convs sharing one Parameter).
``canonical_paths`` names each by its first path, so analysis records one site per tensor,
and ``set_tensor`` replaces every path of a tied tensor, so pruning shrinks it once and the
tie survives.
"""

from __future__ import annotations

import torch
from torch import nn


def get_tensor(gm: nn.Module, path: str) -> torch.Tensor:
    owner, _, attr = path.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def tensor_paths(gm: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every parameter or buffer path -> all paths of the same tensor (first path first)."""
    by_id: dict[int, list[str]] = {}
    for name, t in [
        *gm.named_parameters(remove_duplicate=False),
        *gm.named_buffers(remove_duplicate=False),
    ]:
        by_id.setdefault(id(t), []).append(name)
    return {name: tuple(names) for names in by_id.values() for name in names}


def canonical_paths(gm: nn.Module) -> dict[str, str]:
    """Path -> the first path of the same tensor; only tied tensors are listed."""
    return {p: names[0] for p, names in tensor_paths(gm).items() if len(names) > 1}


def set_tensor(gm: nn.Module, path: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer (under every path it is tied to), keeping its kind and
    requires_grad."""
    paths = tensor_paths(gm).get(path, (path,))
    new: torch.Tensor | None = None
    for p in paths:
        owner_path, _, attr = p.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        old = getattr(owner, attr)
        if isinstance(old, nn.Parameter):
            new = new if new is not None else nn.Parameter(value.detach(), old.requires_grad)
            setattr(owner, attr, new)
        else:
            new = new if new is not None else value.detach().clone()
            persistent = attr not in owner._non_persistent_buffers_set
            owner.register_buffer(attr, new, persistent=persistent)
