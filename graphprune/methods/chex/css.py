"""The linear algebra of CHEX, on plain NumPy arrays: which columns (channels) of a group's
stacked filter matrix to keep, and how far a candidate lies from the span of the kept ones.

Conventions: ``x`` is features x channels, one column per channel (CHEX's X = Wᵀ: a column is
everything a channel's producers hold for it, stacked). Scores are "higher is kept".

The factorizations run in torch (float64), not NumPy: torch honours ``torch.set_num_threads``,
while NumPy's OpenBLAS starts one spinning thread per visible core; on a shared 2-core machine
that made a 288x64 SVD take 1-2 s instead of 10 ms.
"""

from __future__ import annotations

import numpy as np
import torch

# Singular values below this fraction of the largest are treated as zero (numerical rank).
RANK_TOL = 1e-10


def numerical_rank(s: np.ndarray) -> int:
    """How many singular values (sorted descending) are above ``RANK_TOL`` x the largest."""
    if len(s) == 0 or not s[0] > 0:
        return 0
    return int(np.sum(s > RANK_TOL * s[0]))


def leverage_scores(x: np.ndarray, r: int) -> np.ndarray:
    """Per column j of ``x``: ||V_r[j, :]||, V_r the top ``r`` right singular vectors.

    Only singular vectors of non-zero singular values count (r is capped at the numerical
    rank): a zero column (a masked channel) then scores exactly 0 instead of an arbitrary share
    of the null space. The squared scores sum to min(r, rank)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1] == 0:
        return np.zeros(0)
    _, s, vt = _svd(x)
    k = min(int(r), numerical_rank(s))
    return np.linalg.norm(vt[:k].T, axis=1)


def _svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vt = torch.linalg.svd(torch.from_numpy(np.ascontiguousarray(x)), full_matrices=False)
    return u.numpy(), s.numpy(), vt.numpy()


def pivoted_qr_order(x: np.ndarray) -> np.ndarray:
    """Column order of QR with column pivoting (Businger-Golub): at each step the column with
    the largest norm orthogonal to those chosen so far. The first r entries are a deterministic
    column subset of size r. Columns left once the numerical rank is exhausted follow by their
    original norm (largest first)."""
    x = torch.tensor(np.asarray(x, dtype=np.float64))
    n = x.shape[1]
    norms0 = torch.linalg.vector_norm(x, dim=0).numpy()
    scale = float(norms0.max()) if n else 0.0
    remaining = list(range(n))
    order: list[int] = []
    while remaining:
        rest = x[:, remaining]
        norms = torch.linalg.vector_norm(rest, dim=0)
        i = int(torch.argmax(norms))
        if not float(norms[i]) > RANK_TOL * scale:
            break
        j = remaining.pop(i)
        order.append(j)
        q = x[:, j] / norms[i]
        x[:, remaining] -= torch.outer(q, q @ x[:, remaining])
    rest = sorted(remaining, key=lambda j: (-norms0[j], j))
    return np.asarray(order + rest, dtype=np.int64)


def l1_scores(x: np.ndarray) -> np.ndarray:
    """Per column: the L1 norm (the official code's criterion for wide matrices)."""
    return np.abs(np.asarray(x, dtype=np.float64)).sum(axis=0)


def keep_order(x: np.ndarray, r: int, selection: str) -> np.ndarray:
    """Columns of ``x``, the ones to keep first, for keeping ``r`` of them.

    ``leverage``: by leverage score with the top-r right singular vectors, ties (zero columns,
    r = all) broken by L1 norm; ``qr``: QR with column pivoting. A wide matrix (fewer features
    than columns: r singular vectors cannot tell the columns apart) is ordered by L1 norm, as
    the official code does."""
    x = np.asarray(x, dtype=np.float64)
    l1 = l1_scores(x)
    if x.shape[0] < x.shape[1]:
        return np.lexsort((np.arange(len(l1)), -l1))
    if selection == "qr":
        return pivoted_qr_order(x)
    if selection != "leverage":
        raise ValueError(f"selection={selection!r}: must be 'leverage' or 'qr'")
    lev = leverage_scores(x, r)
    return np.lexsort((np.arange(len(l1)), -l1, -np.round(lev, 12)))


def projection_residual(basis: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Per candidate column w_j: ||(I - P) w_j||, P the orthogonal projector onto the span of
    ``basis``'s columns (P = B(BᵀB)⁺Bᵀ, computed from an orthonormal basis of B's range)."""
    c = np.asarray(candidates, dtype=np.float64)
    b = np.asarray(basis, dtype=np.float64)
    if b.size == 0 or c.size == 0:
        return np.linalg.norm(c, axis=0)
    u, s, _ = _svd(b)
    u = torch.from_numpy(np.ascontiguousarray(u[:, : numerical_rank(s)]))
    ct = torch.from_numpy(np.ascontiguousarray(c))
    return torch.linalg.vector_norm(ct - u @ (u.T @ ct), dim=0).numpy()


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def sample_softmax(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct indices, drawn one after another without replacement, each draw with
    probability softmax(``scores``) renormalised over what is left (Gumbel-top-k: the k largest
    of score + Gumbel noise have exactly that distribution, in draw order)."""
    scores = np.asarray(scores, dtype=np.float64)
    k = int(k)
    if not 0 <= k <= len(scores):
        raise ValueError(f"cannot draw {k} of {len(scores)} without replacement")
    keys = scores + rng.gumbel(size=len(scores))
    return np.argsort(-keys, kind="stable")[:k]
