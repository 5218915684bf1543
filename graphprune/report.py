"""What a compression did, in numbers: MACs, params, widths, accuracy, and the method's stats.

Nothing here knows a method: the config is rendered as a dict and the stats, a frozen
dataclass of the method's choosing, field by field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass

from graphprune.analysis import ChannelGroup
from graphprune.planning.macs import MacsReport


@dataclass(frozen=True, slots=True)
class GroupWidth:
    id: int
    producers: tuple[str, ...]
    before: int
    after: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CompressionReport:
    """MACs follow the convention of ALGORITHMS.md: conv + linear multiply-accumulates.

    ``accuracy_*`` are top-1 percentages on the ``val_loader`` given to compress (None without
    one): right before the finalize passes and after them. ``stats`` is the method's own
    frozen dataclass (None if it has none). ``frozen_submodules`` maps each submodule fx
    could not trace, kept whole and unpruned, to the reason (frontend.fallback).
    ``functional_layers`` maps each layer written as ``F.conv2d``/``F.linear`` on parameters
    (or on a weight computed from them, as weight standardization does) that became a module,
    so it could be pruned, to what it replaced (frontend.functional_layers).
    ``eval_mode_only`` says why the model was traced in eval mode only (its own forward runs
    train-mode-only code, such as auxiliary classifiers, that the result does not have); None
    when the result behaves like the model in both modes."""

    method: str
    flops_target: float
    dense_macs: int
    pruned_macs: int
    dense_params: int
    pruned_params: int
    widths: tuple[GroupWidth, ...]
    seconds: float
    config: dict[str, object] = field(default_factory=dict)
    train_seconds: float | None = None
    accuracy_before_finalize: float | None = None
    accuracy_after_finalize: float | None = None
    stats: object | None = None
    frozen_submodules: dict[str, str] = field(default_factory=dict)
    eval_mode_only: str | None = None
    functional_layers: dict[str, str] = field(default_factory=dict)

    @property
    def macs_ratio(self) -> float:
        """Remaining MACs / dense MACs (the quantity flops_target asks for)."""
        return self.pruned_macs / self.dense_macs

    def stats_dict(self) -> dict[str, object]:
        """The method's stats as a flat name -> value dict ({} when it has none)."""
        s = self.stats
        return {f.name: getattr(s, f.name) for f in fields(s)} if is_dataclass(s) else {}

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["macs_ratio"] = self.macs_ratio
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def format(self) -> str:
        lines = [
            f"method {self.method}, target {self.flops_target:.3f} of dense MACs, "
            f"{self.seconds:.2f} s",
            f"  MACs   {self.dense_macs / 1e6:10.3f} M -> {self.pruned_macs / 1e6:10.3f} M "
            f"({self.macs_ratio:.3f} kept, {1 - self.macs_ratio:.1%} fewer)",
            f"  params {self.dense_params / 1e6:10.4f} M -> {self.pruned_params / 1e6:10.4f} M "
            f"({1 - self.pruned_params / self.dense_params:.1%} fewer)",
        ]
        generic = {
            "train_seconds": self.train_seconds,
            "accuracy_before_finalize": self.accuracy_before_finalize,
            "accuracy_after_finalize": self.accuracy_after_finalize,
        }
        for key, value in {**generic, **self.stats_dict()}.items():
            if value is not None:
                lines.append(
                    f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}"
                )
        for name, why in self.frozen_submodules.items():
            lines.append(f"  frozen (not traced, not pruned): {name}: {why}")
        if self.eval_mode_only:
            lines.append(f"  eval mode only: {self.eval_mode_only}")
        for name, why in self.functional_layers.items():
            lines.append(f"  functional layer made a module: {name}: {why}")
        lines.append("  group  width           producers")
        for w in self.widths:
            lines.append(f"  {w.id:5d}  {w.before:5d} -> {w.after:<5d}  {', '.join(w.producers)}")
        return "\n".join(lines)


def build_report(
    *,
    method: str,
    config: dict[str, object],
    before: MacsReport,
    after: MacsReport,
    groups: Sequence[ChannelGroup],
    widths_after: dict[int, int],
    seconds: float,
    train_seconds: float | None = None,
    accuracy_before_finalize: float | None = None,
    accuracy_after_finalize: float | None = None,
    stats: object | None = None,
    frozen_submodules: dict[str, str] | None = None,
    eval_mode_only: str | None = None,
    functional_layers: dict[str, str] | None = None,
) -> CompressionReport:
    widths = tuple(
        GroupWidth(g.id, g.producers, g.channels, widths_after.get(g.id, g.channels))
        for g in groups
        if g.prunable
    )
    return CompressionReport(
        method=method,
        flops_target=float(config["flops_target"]),  # type: ignore[arg-type]
        dense_macs=before.macs,
        pruned_macs=after.macs,
        dense_params=before.params,
        pruned_params=after.params,
        widths=widths,
        seconds=seconds,
        config=config,
        train_seconds=train_seconds,
        accuracy_before_finalize=accuracy_before_finalize,
        accuracy_after_finalize=accuracy_after_finalize,
        stats=stats,
        frozen_submodules=dict(frozen_submodules or {}),
        eval_mode_only=eval_mode_only,
        functional_layers=dict(functional_layers or {}),
    )
