"""Coverage of real model zoos: does compress() reach the target, exactly, on real networks?

One record per model (``check_model``): how it traced (plainly, or with frozen submodules),
its channel groups, the share of dense MACs a prunable group touches, the MACs ratio
``compress(model, "magnitude", flops_target=0.5)`` reached (measured independently with
FlopCounterMode on the returned model against the user's model), exactness of a random plan
(zero the planned-away channels in every member, then prune: outputs must not move), output
shapes kept, the user's model untouched, and the time of each stage.

The outcome of a model is one of:

- ``ok``: target reached within ``TOLERANCE``, exact, every output shape kept, model untouched;
- ``refused``: compress raised PlanError (an honest "cannot", with its reason);
- ``shortfall``: compress returned a model with more MACs than asked and no error (a bug);
- ``undershoot``: it returned one more than ``TOLERANCE`` under the target (pruned more than
  asked: a miss too);
- ``inexact`` / ``shape`` / ``mutated``: the returned model is wrong in that way (a bug);
- ``error``: any other exception (trace failure, a pass breaking, ...).

The model lists live in ``graphprune.testing.zoo_lists``; this module needs only torch.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from graphprune.planning.target import TOLERANCE


@dataclass(frozen=True, slots=True)
class ZooRecord:
    """What one model did. Times are seconds; ratios are remaining / dense MACs."""

    name: str
    source: str
    input_shape: tuple[int, ...]
    status: str
    reason: str = ""
    traced: str = ""  # "plain", "frozen: a.b (why); ..." or "" when tracing failed
    groups: int = 0
    prunable_groups: int = 0
    prunable_macs_share: float | None = None  # dense MACs in layers a prunable group shrinks
    dense_gmacs: float | None = None
    reached: float | None = None
    exact_error: float | None = None  # max |pruned - zeroed| / max |zeroed| on a random plan
    shapes_kept: bool | None = None
    untouched: bool | None = None
    trace_s: float | None = None
    analyze_s: float | None = None
    compress_s: float | None = None
    exact_s: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _flatten(out: object) -> list[torch.Tensor]:
    from graphprune.backends.onnx import flatten_outputs

    return flatten_outputs(out)


def _fingerprint(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _short(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def prunable_share(graph, layer_macs: dict[str, int]) -> float:
    """Share of all dense MACs in conv/linear layers that some prunable group shrinks."""
    prunable = np.array([g.prunable for g in graph.groups], dtype=bool)
    total = sum(int(v) for v in layer_macs.values())
    touched = 0
    for layer in graph.mac_layers:
        sides = [a for a in (layer.in_atoms, layer.out_atoms) if a is not None]
        if any(a.size and prunable[graph.atom_group[a.reshape(-1)]].any() for a in sides):
            touched += int(layer_macs.get(layer.target, 0))
    return touched / total if total else 0.0


@torch.no_grad()
def exactness_error(gm, graph, x: Sequence[torch.Tensor], *, seed: int = 0) -> float | None:
    """Zero the channels a random plan drops, then prune them: the relative output change.

    Mutates ``gm`` (a traced copy). Norm statistics and affine parameters are randomized
    first, so the check is not vacuous. None when there is no exact prunable group.
    """
    from graphprune.passes import prune_channels
    from graphprune.testing.exactness import random_plan, randomize_, zero_dropped_channels

    randomize_(gm, seed)
    plan = random_plan(graph, np.random.default_rng(seed))
    if not plan:
        return None
    zero_dropped_channels(gm, graph, plan)
    gm.eval()
    zeroed = _flatten(gm(*x))
    prune_channels(gm, plan=plan, round_to=1)
    pruned = _flatten(gm(*x))
    err = 0.0
    for a, b in zip(zeroed, pruned, strict=True):
        if a.shape != b.shape:
            return float("inf")
        scale = a.abs().max().item() if a.numel() else 0.0
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        err = max(err, diff / max(scale, 1e-12))
    return err


def check_model(
    name: str,
    source: str,
    build: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    *,
    target: float = 0.5,
    exact_tol: float = 1e-4,
    seed: int = 0,
) -> ZooRecord:
    """Run the whole check on one model; never raises (a failure is a record)."""
    import graphprune as gp
    from graphprune.analysis import build_channel_graph
    from graphprune.errors import PlanError
    from graphprune.frontend.fallback import (
        eval_mode_only,
        frozen_submodules,
        trace_with_fallback,
    )
    from graphprune.frontend.trace import FUNCTIONAL_LAYERS

    torch.manual_seed(seed)
    base = dict(name=name, source=source, input_shape=tuple(input_shape))
    try:
        model = build().eval()
    except Exception as exc:
        return ZooRecord(**base, status="error", reason="building: " + _short(exc))
    x = (torch.randn(input_shape),)
    with torch.no_grad():
        ref = _flatten(model(*x))
    before = _fingerprint(model)
    info: dict[str, object] = {}
    try:
        gm, info["trace_s"] = _timed(lambda: trace_with_fallback(model, x))
    except Exception as exc:
        return ZooRecord(**base, status="error", reason="trace: " + _short(exc))
    frozen = frozen_submodules(gm)
    notes = [f"frozen: {k} ({v})" for k, v in frozen.items()]
    if eval_mode_only(gm):
        notes.append("eval mode only (train-mode-only code in its own forward)")
    if gm.meta.get(FUNCTIONAL_LAYERS):
        notes.append(f"{len(gm.meta[FUNCTIONAL_LAYERS])} functional layers made modules")
    info["traced"] = "; ".join(notes) or "plain"
    try:
        t = time.perf_counter()
        graph = build_channel_graph(gm)
        info["analyze_s"] = time.perf_counter() - t
        dense = gp.count_macs(model, x)
        layer_macs = gp.count_macs(gm, x).per_layer
        info["groups"] = len(graph.groups)
        info["prunable_groups"] = sum(g.prunable for g in graph.groups)
        info["prunable_macs_share"] = prunable_share(graph, layer_macs)
        info["dense_gmacs"] = dense.macs / 1e9
    except Exception as exc:
        return ZooRecord(**base, **info, status="error", reason="analysis: " + _short(exc))
    try:
        result, info["compress_s"] = _timed(
            lambda: gp.compress(model, "magnitude", example_inputs=x, flops_target=target)
        )
    except PlanError as exc:
        info["untouched"] = _same_state(before, _fingerprint(model))
        return ZooRecord(**base, **info, status="refused", reason=_short(exc, 3000))
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        where = f" (at {tb.filename.rsplit('/', 2)[-1]}:{tb.lineno})"
        return ZooRecord(**base, **info, status="error", reason="compress: " + _short(exc) + where)
    info["untouched"] = _same_state(before, _fingerprint(model))
    pruned = result.model
    info["reached"] = gp.count_macs(pruned, x).macs / dense.macs
    with torch.no_grad():
        out = _flatten(pruned(*x))
    info["shapes_kept"] = [t.shape for t in out] == [t.shape for t in ref]
    del result, pruned, out
    try:
        t = time.perf_counter()
        info["exact_error"] = exactness_error(gm, graph, x, seed=seed)
        info["exact_s"] = time.perf_counter() - t
    except Exception as exc:
        return ZooRecord(**base, **info, status="error", reason="exactness: " + _short(exc))
    status, reason = "ok", ""
    if info["reached"] > target + TOLERANCE:
        status = "shortfall"
        reason = f"compress returned {info['reached']:.3f} of the MACs for target {target}"
    elif info["reached"] < target - TOLERANCE:  # pruned more than asked: also a miss
        status = "undershoot"
        reason = f"compress returned {info['reached']:.3f} of the MACs for target {target}"
    elif info["exact_error"] is not None and not info["exact_error"] <= exact_tol:
        status, reason = "inexact", f"random plan moved outputs by {info['exact_error']:.2e}"
    elif not info["shapes_kept"]:
        status, reason = "shape", "an output shape changed"
    elif not info["untouched"]:
        status, reason = "mutated", "compress changed the user's model"
    return ZooRecord(**base, **info, status=status, reason=reason)


@dataclass(frozen=True, slots=True)
class ResRepRecord:
    """ResRep on one real model: a short run through its training hooks, then finalize."""

    name: str
    source: str
    status: str  # ok, refused (PlanError), inexact, missed (not within TOLERANCE), error
    reason: str = ""
    compactor_groups: int = 0  # groups whose rows are compactors (dense conv producers)
    kernel_groups: int = 0  # groups whose rows are their own weights (kernel_rows.py)
    reached: float | None = None
    fold_error: float | None = None  # max |finalized - trained| / max |trained|, eval mode
    seconds: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# A short ResRep schedule for the zoo: warm-up 1 step, masks chosen at steps 1-3 (the last one
# lands on the target), masked rows pushed for 2 steps and zeroed from step 5; 6 steps run.
RESREP_STEPS = 6


def check_resrep(
    name: str,
    source: str,
    build: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    *,
    target: float = 0.5,
    fold_tol: float = 1e-4,
    seed: int = 0,
) -> ResRepRecord:
    """Train ResRep for RESREP_STEPS steps (batch 2 of random images, the mean square of every
    output as the loss, so classifiers, detectors and segmenters alike), then check the
    finalized model computes what the trained one did (eval mode) and lands within TOLERANCE
    under the target (or as close as channel steps allow). Never raises."""
    from graphprune.errors import PlanError
    from graphprune.frontend.fallback import trace_with_fallback
    from graphprune.methods.resrep import ResRep, ResRepSchedule
    from graphprune.planning.macs import count_macs
    from graphprune.testing.method_runs import assert_lands

    schedule = ResRepSchedule(
        warmup_iters=1,
        mask_interval=1,
        channels_per_update=10**9,
        penalty=1e-4,
        masked_penalty=1e-2,
        compactor_momentum=0.9,
        mask_until=3,
        zero_at=5,
        penalty_until=3,
    )
    base = dict(name=name, source=source)
    start = time.perf_counter()
    torch.manual_seed(seed)
    try:
        model = _no_zero_layers(build().train(), seed)
        x = torch.randn(input_shape)
        gm = trace_with_fallback(model, (x,))
        dense = count_macs(gm, (x,)).macs
        rr = ResRep(gm, flops_target=target, total_iters=RESREP_STEPS, lr=0.01, schedule=schedule)
    except PlanError as exc:
        return ResRepRecord(**base, status="refused", reason=_short(exc, 1000))
    except Exception as exc:
        return ResRepRecord(**base, status="error", reason="prepare: " + _short(exc))
    rows = dict(
        compactor_groups=len({c.group for c in rr.compactors}),
        kernel_groups=len(rr.kernel.groups) if rr.kernel is not None else 0,
    )
    try:
        opt = torch.optim.SGD(rr.param_groups(0.01, momentum=0.0), lr=0.01, momentum=0.0)
        batch = torch.randn(2, *input_shape[1:], generator=torch.Generator().manual_seed(seed))
        for _ in range(RESREP_STEPS):
            loss = torch.stack([t.float().pow(2).mean() for t in _flatten(rr.model(batch))])
            opt.zero_grad()
            loss.mean().backward()
            rr.after_backward()
            opt.step()
            rr.step()
        rr.model.eval()
        kept = {g: np.nonzero(m)[0] for g, m in rr.masks().items()}
        with torch.no_grad():
            trained = _flatten(rr.model(x))
            pruned = rr.finalize()
            final = _flatten(pruned(x))
        reached = count_macs(pruned, (x,)).macs / dense
    except Exception as exc:
        return ResRepRecord(**base, **rows, status="error", reason="train/finalize: " + _short(exc))
    err = 0.0
    for a, b in zip(trained, final, strict=True):
        scale = a.abs().max().item() if a.numel() else 0.0
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        err = max(err, diff / max(scale, 1e-12))
    status, reason = "ok", ""
    if not err <= fold_tol:
        status, reason = "inexact", f"finalize moved outputs by {err:.2e}"
    else:
        try:
            assert_lands(rr.graph, rr.layer_macs, kept, reached, target)
        except AssertionError as exc:
            status, reason = "missed", _short(exc)
    return ResRepRecord(
        **base,
        **rows,
        status=status,
        reason=reason,
        reached=reached,
        fold_error=err,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def _no_zero_layers(model: nn.Module, seed: int) -> nn.Module:
    """Small random weights for conv/linear layers initialised to zero (timm zero-initialises
    some classifier heads), so comparing outputs before and after finalize is not vacuous."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and w is not None and not w.any():
            w.copy_(0.02 * torch.randn(w.shape, generator=g))
    return model
