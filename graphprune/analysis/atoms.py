"""Channel atoms: the bookkeeping under dependency analysis.

Every channel a producer (conv, linear, network input) creates is an *atom*, an integer id.
Each tensor in the graph records which of its dims carry channels and, for every position
along those dims, which atom sits there (``TensorChannels``). Ops that force channels to be
pruned together (residual add, SE multiply, GroupNorm groups, conv groups) union atoms in a
union-find; the resulting classes are the prunable units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ChannelError(Exception):
    """A tensor op moves channels in a way the atom model cannot represent."""


@dataclass(frozen=True, slots=True)
class TensorChannels:
    """Which atom sits at each position of a tensor's channel-carrying dims.

    ``dims`` are absolute, sorted tensor dims (0 is the batch and never carries channels);
    ``atoms`` has one axis per entry of ``dims``. Dims not listed are spatial or otherwise
    channel-free. ``opaque`` marks a tensor whose channels are unknown (made by an op with no
    rule): every one of its dims of size > 1 must be treated as possibly carrying channels.
    """

    dims: tuple[int, ...]
    atoms: np.ndarray
    opaque: bool = False
    # True when a channel whose producer entries are all zero may be non-zero here (it went
    # through sigmoid, a non-affine BatchNorm, "+ 1", ...): removing it is then not exact.
    nonzero_when_zeroed: bool = False

    @staticmethod
    def unknown() -> TensorChannels:
        return TensorChannels((), np.zeros((), dtype=np.int64), opaque=True)

    @staticmethod
    def free() -> TensorChannels:
        """A tensor whose dims carry no channels at all (e.g. a constant mask)."""
        return TensorChannels((), np.zeros((), dtype=np.int64))

    @property
    def carries(self) -> bool:
        return bool(self.dims)

    def all_atoms(self) -> np.ndarray:
        return self.atoms.reshape(-1) if self.dims else np.zeros(0, dtype=np.int64)

    def along(self, dim: int) -> np.ndarray:
        """The 1-D atoms of ``dim`` when it is the only carried dim."""
        if self.dims != (dim,):
            raise ChannelError(f"channels on dims {self.dims}, expected exactly dim {dim}")
        return self.atoms

    def with_dims(self, dims: tuple[int, ...], atoms: np.ndarray | None = None) -> TensorChannels:
        """Same flags, new dims (and atoms)."""
        atoms = self.atoms if atoms is None else atoms
        return TensorChannels(dims, atoms, self.opaque, self.nonzero_when_zeroed)

    def offset_dims(self, offset: int) -> TensorChannels:
        return self.with_dims(tuple(d + offset for d in self.dims))

    def marked_nonzero(self, flag: bool = True) -> TensorChannels:
        return TensorChannels(self.dims, self.atoms, self.opaque, flag)

    def permuted(self, perm: list[int]) -> TensorChannels:
        """Output dim i is input dim perm[i]."""
        new_dims = [perm.index(d) for d in self.dims]
        order = np.argsort(new_dims)
        return self.with_dims(tuple(sorted(new_dims)), np.transpose(self.atoms, order))

    def sliced(self, dim: int, start: int, stop: int) -> TensorChannels:
        if dim not in self.dims:
            return self
        axis = self.dims.index(dim)
        index = [slice(None)] * len(self.dims)
        index[axis] = slice(start, stop)
        return self.with_dims(self.dims, self.atoms[tuple(index)])

    def without_dims(self, removed: list[int]) -> TensorChannels:
        """Drop channel-free dims (reductions, integer indexing); later dims shift down."""
        if any(d in self.dims for d in removed):
            raise ChannelError(f"dims {removed} carry channels")
        dims = tuple(d - sum(r < d for r in removed) for d in self.dims)
        return self.with_dims(dims)

    def reshaped(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> TensorChannels:
        """Follow a view/reshape/flatten/squeeze from ``in_shape`` to ``out_shape``.

        The shapes are split into groups of dims whose sizes multiply to the same number;
        channels may move only inside one group that excludes the batch dim. The atoms of
        that group are laid out over its full input extent, reshaped, and output dims along
        which the atoms are constant (spatial ones) are dropped again.
        """
        if self.opaque or not self.dims:
            return self
        for gi, gj in _reshape_groups(in_shape, out_shape):
            if not any(d in gi for d in self.dims):
                continue
            if any(d not in gi for d in self.dims):
                raise ChannelError("reshape splits channel dims across independent groups")
            if 0 in gi or 0 in gj:
                raise ChannelError("reshape mixes the batch dim with channels")
            grid = self.atoms.reshape([in_shape[d] if d in self.dims else 1 for d in gi])
            grid = np.broadcast_to(grid, [in_shape[d] for d in gi]).reshape(
                [out_shape[d] for d in gj]
            )
            keep = [a for a in range(grid.ndim) if not _constant_along(grid, a)]
            grid = grid[tuple(slice(None) if a in keep else 0 for a in range(grid.ndim))]
            return self.with_dims(tuple(gj[a] for a in keep), np.ascontiguousarray(grid))
        raise ChannelError(f"cannot follow reshape {in_shape} -> {out_shape}")


def _constant_along(grid: np.ndarray, axis: int) -> bool:
    if grid.shape[axis] == 1:
        return True
    first = np.take(grid, [0], axis=axis)
    return bool(np.all(grid == first))


def _reshape_groups(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of input and output dims with equal products."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    n, m = len(in_shape), len(out_shape)
    while i < n or j < m:
        gi: list[int] = []
        gj: list[int] = []
        pi = pj = 1
        if i < n:
            gi.append(i)
            pi = in_shape[i]
            i += 1
        if j < m:
            gj.append(j)
            pj = out_shape[j]
            j += 1
        while pi != pj:
            if pi < pj and i < n:
                gi.append(i)
                pi *= in_shape[i]
                i += 1
            elif pj < pi and j < m:
                gj.append(j)
                pj *= out_shape[j]
                j += 1
            else:
                raise ChannelError(f"shapes {in_shape} and {out_shape} differ in size")
        groups.append((gi, gj))
    return groups


def unique_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The distinct (a[i], b[i]) of two non-negative integer arrays, as a 2 x k array sorted by
    a then b (what ``np.unique(np.stack([a, b]), axis=1)`` gives, without its slow 2-D sort)."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.size == 0:
        return np.zeros((2, 0), dtype=np.int64)
    width = int(b.max()) + 1
    keys = np.unique(a * width + b)
    return np.stack([keys // width, keys % width])


class UnionFind:
    """Equivalence classes of atom ids; atoms are allocated in order.

    Unions are only recorded during the walk (no rule needs a class mid-walk) and resolved
    once, vectorized, by ``roots``: per-atom Python unions grew with every channel of every
    depthwise conv and residual add. Each class is named by its first (smallest) atom.
    """

    def __init__(self) -> None:
        self.count = 0
        self._left: list[np.ndarray] = []
        self._right: list[np.ndarray] = []

    def new(self, count: int) -> np.ndarray:
        start = self.count
        self.count += count
        return np.arange(start, start + count, dtype=np.int64)

    def union(self, a: int, b: int) -> None:
        self.union_arrays(np.asarray([a]), np.asarray([b]))

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Atom ``a[i]`` and atom ``b[i]`` are one class, for every i."""
        a, b = np.asarray(a, dtype=np.int64).reshape(-1), np.asarray(b, dtype=np.int64).reshape(-1)
        if a.shape != b.shape:
            raise ValueError(f"union of {a.size} atoms with {b.size}")
        self._left.append(a)
        self._right.append(b)

    def tie(self, atoms: np.ndarray) -> None:
        """Make all given atoms one class: they can only be pruned together."""
        flat = np.asarray(atoms, dtype=np.int64).reshape(-1)
        if flat.size > 1:
            self.union_arrays(np.full(flat.size - 1, flat[0]), flat[1:])

    def tie_rows(self, rows: np.ndarray) -> None:
        """Tie the atoms of each row (one class per row) in one call."""
        rows = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)
        if rows.shape[1] > 1:
            self.union_arrays(np.repeat(rows[:, :1], rows.shape[1] - 1, axis=1), rows[:, 1:])

    def roots(self) -> np.ndarray:
        """The smallest atom of each atom's class: minimum-label propagation along the
        recorded unions, with pointer jumping, until nothing changes."""
        label = np.arange(self.count, dtype=np.int64)
        if not self._left:
            return label
        a, b = np.concatenate(self._left), np.concatenate(self._right)
        while True:
            low = np.minimum(label[a], label[b])
            before = label.copy()
            np.minimum.at(label, a, low)
            np.minimum.at(label, b, low)
            while True:  # pointer jumping: follow labels to their own labels
                jumped = label[label]
                if np.array_equal(jumped, label):
                    break
                label = jumped
            if np.array_equal(label, before):
                return label

    def find(self, a: int) -> int:
        return int(self.roots()[a])
