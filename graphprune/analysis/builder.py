"""The values analysis produces (sites, groups, the channel graph) and the Builder that the
channel rules drive while walking the graph. A ``ChannelGraph`` knows for every parameter
axis and every tensor which channel atom sits at each index, and which atoms form one class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from graphprune.analysis.atoms import TensorChannels, UnionFind
from graphprune.errors import UnsupportedOpError
from graphprune.frontend.params import canonical_paths


@dataclass(frozen=True, slots=True)
class Site:
    """One axis of one parameter or buffer whose indices follow channel atoms.

    ``role`` is "out" for producer-side entries (conv rows, biases, norm affine parameters,
    layer scales: zeroing them makes the channel zero) and "in" for consumer-side entries.
    """

    path: str
    axis: int
    atoms: np.ndarray
    role: str


@dataclass(frozen=True, slots=True)
class MacLayer:
    """A conv or linear module, for predicting MACs from channel counts."""

    target: str
    in_atoms: np.ndarray | None  # None: input width does not scale its MACs (grouped conv)
    out_atoms: np.ndarray


@dataclass(frozen=True, slots=True)
class Member:
    """A place a group's channels appear: ``name`` (module or parameter path) and ``role``."""

    name: str
    role: str
    size: int


@dataclass(frozen=True, slots=True)
class ChannelGroup:
    """Channels that must be pruned together, across every member that holds them.

    Channel ``k`` of the group is one class of tied atoms; removing it removes the matching
    indices from every member. ``producers`` are the dense conv/linear modules that create
    the group's channels (where ResRep puts compactors).
    """

    id: int
    channels: int
    members: tuple[Member, ...]
    producers: tuple[str, ...]
    prunable: bool
    reasons: tuple[str, ...] = ()
    exact: bool = True
    inexact_reasons: tuple[str, ...] = ()


@dataclass
class ChannelGraph:
    """Everything analysis learned; passes use it, users mostly need ``groups``."""

    groups: list[ChannelGroup]
    sites: list[Site]
    values: dict[fx.Node, object]
    mac_layers: list[MacLayer]
    atom_group: np.ndarray  # atom -> group id
    atom_pos: np.ndarray  # atom -> channel index inside its group
    atom_source: np.ndarray  # atom -> index of the op that created it
    sources: list[tuple[str, str]]  # (module or node name, kind) per source index

    _tensor_sides: list[tuple[str, np.ndarray]] | None = field(default=None, repr=False)

    def positions(self, atoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.atom_group[atoms], self.atom_pos[atoms]

    def tensor_sides(self) -> list[tuple[str, np.ndarray]]:
        """(label, atoms) of everything a plan must leave at least one channel in: each
        parameter axis (site) and each traced tensor that carries channels, unless it only
        feeds concatenations (a zero-channel part of a cat is fine: that path is gone). Sites
        alone miss tensors without parameters, e.g. the part of a split that goes through a
        pooling layer into a concatenation (Res2Net): emptied, the pooling fails."""
        if self._tensor_sides is None:
            seen: set[bytes] = set()
            sides = []
            labelled = [(f"axis {s.axis} of {s.path}", s.atoms) for s in self.sites] + [
                (f"the output of node {node.name}", value.all_atoms())
                for node, value in self.values.items()
                if isinstance(value, TensorChannels)
                and value.dims
                and not all(u.target in _CONCATENATIONS for u in node.users)
            ]
            for label, atoms in labelled:
                atoms = np.unique(atoms.reshape(-1))
                key = atoms.tobytes()
                if atoms.size and key not in seen:
                    seen.add(key)
                    sides.append((label, atoms))
            self._tensor_sides = sides
        return self._tensor_sides

    def removed_mask(self, plan: dict[int, np.ndarray]) -> np.ndarray:
        """Boolean per atom: True when the plan drops its channel."""
        removed = np.zeros(len(self.atom_group), dtype=bool)
        for gid, keep in plan.items():
            drop = np.ones(self.groups[gid].channels, dtype=bool)
            drop[keep] = False
            in_group = self.atom_group == gid
            removed[in_group] = drop[self.atom_pos[in_group]]
        return removed


@dataclass
class Builder:
    """Mutable state of one analysis walk; rules call its methods."""

    gm: fx.GraphModule
    strict: bool = False
    prune_heads: bool = False  # a channel grid (heads, head_dim) shrinks along heads
    uf: UnionFind = field(default_factory=UnionFind)
    source_of: list[int] = field(default_factory=list)  # atom -> source index
    sources: list[tuple[str, str]] = field(default_factory=list)  # (name, kind)
    blocked: dict[int, str] = field(default_factory=dict)
    inexact: dict[int, str] = field(default_factory=dict)
    sites: list[Site] = field(default_factory=list)
    site_index: dict[tuple[str, int], int] = field(default_factory=dict)
    mac_layers: list[MacLayer] = field(default_factory=list)
    values: dict[fx.Node, object] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # tied tensor path -> first path

    def __post_init__(self) -> None:
        self.aliases = canonical_paths(self.gm)

    # --- used by rules -------------------------------------------------------------------
    def value(self, arg: object) -> object:
        return self.values.get(arg) if isinstance(arg, fx.Node) else None

    def fresh(self, count: int, name: str, kind: str) -> np.ndarray:
        """New atoms for channels created by ``name`` (kind: producer, grouped, input)."""
        atoms = self.uf.new(count)
        self.sources.append((name, kind))
        self.source_of.extend([len(self.sources) - 1] * count)
        return atoms

    def block(self, atoms: np.ndarray, reason: str) -> None:
        for a in atoms.reshape(-1).tolist():
            self.blocked.setdefault(a, reason)

    def block_value(self, value: object, reason: str) -> None:
        for tc in _tensor_values(value):
            self.block(tc.all_atoms(), reason)

    def mark_inexact(self, atoms: np.ndarray, reason: str) -> None:
        for a in atoms.reshape(-1).tolist():
            self.inexact.setdefault(a, reason)

    def site(self, path: str, axis: int, atoms: np.ndarray, role: str) -> None:
        atoms = np.asarray(atoms, dtype=np.int64)
        # Tied weights are one tensor: one site, and the channels of every user correspond.
        path = self.aliases.get(path, path)
        seen = self.site_index.get((path, axis))
        if seen is not None:
            # A module called twice shares its weights: both calls' channels correspond.
            self.uf.union_arrays(self.sites[seen].atoms, atoms)
            return
        self.site_index[(path, axis)] = len(self.sites)
        self.sites.append(Site(path, axis, atoms, role))

    def unknown(self, node: fx.Node, why: str) -> TensorChannels:
        """An op we cannot follow: its inputs' channels become unprunable."""
        reason = f"{node.name} ({node.op} {_target_name(node)}): {why}"
        if self.strict:
            raise UnsupportedOpError(
                f"{reason}. Register a channel rule for it (graphprune.analysis.rules.register) or "
                "use strict=False to leave the channels it touches unpruned."
            )
        for arg in node.all_input_nodes:
            self.block_value(self.values.get(arg), reason)
        return TensorChannels.unknown()


_CONCATENATIONS = (torch.cat, torch.concat, torch.concatenate)

# gm.meta key: read attention's channel grids as whole heads (see ``prune_whole_heads``).
PRUNE_HEADS = "graphprune.prune_heads"


def _tensor_values(value: object) -> list[TensorChannels]:
    if isinstance(value, TensorChannels):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tc for v in value for tc in _tensor_values(v)]
    return []


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))
