"""What a compression did, in numbers: MACs, params, widths, and method-specific extras."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from graphprune.analysis import ChannelGroup
from graphprune.planning.macs import MacsReport


@dataclass(frozen=True, slots=True)
class GroupWidth:
    id: int
    producers: tuple[str, ...]
    before: int
    after: int


@dataclass(frozen=True, slots=True)
class CompressionReport:
    """MACs follow the convention of ALGORITHMS.md: conv + linear multiply-accumulates."""

    method: str
    flops_target: float
    dense_macs: int
    pruned_macs: int
    dense_params: int
    pruned_params: int
    widths: tuple[GroupWidth, ...]
    seconds: float
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def macs_ratio(self) -> float:
        """Remaining MACs / dense MACs (the quantity flops_target asks for)."""
        return self.pruned_macs / self.dense_macs

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
        for key, value in self.extra.items():
            lines.append(
                f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}"
            )
        lines.append("  group  width           producers")
        for w in self.widths:
            lines.append(f"  {w.id:5d}  {w.before:5d} -> {w.after:<5d}  {', '.join(w.producers)}")
        return "\n".join(lines)


def build_report(
    method: str,
    flops_target: float,
    before: MacsReport,
    after: MacsReport,
    groups: Sequence[ChannelGroup],
    widths_after: dict[int, int],
    seconds: float,
    extra: dict[str, object] | None = None,
) -> CompressionReport:
    widths = tuple(
        GroupWidth(g.id, g.producers, g.channels, widths_after.get(g.id, g.channels))
        for g in groups
        if g.prunable
    )
    return CompressionReport(
        method,
        flops_target,
        before.macs,
        after.macs,
        before.params,
        after.params,
        widths,
        seconds,
        dict(extra or {}),
    )
