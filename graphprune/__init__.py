"""graphprune: a graph-level structured-pruning compiler for PyTorch CNNs."""

from graphprune.analysis import ChannelGroup, analyze, build_channel_graph, prune_whole_heads
from graphprune.api import CompressionResult, compress, export
from graphprune.errors import (
    BackendUnavailableError,
    ExportError,
    GraphInvariantError,
    GraphpruneError,
    InputError,
    PlanError,
    TargetMissedError,
    TraceError,
    TrainingError,
    UnsupportedOpError,
)
from graphprune.frontend.trace import trace
from graphprune.planning.macs import MacsReport, count_macs

__all__ = [
    "CompressionResult",
    "compress",
    "export",
    "BackendUnavailableError",
    "ChannelGroup",
    "ExportError",
    "GraphInvariantError",
    "GraphpruneError",
    "InputError",
    "MacsReport",
    "PlanError",
    "TargetMissedError",
    "TraceError",
    "TrainingError",
    "UnsupportedOpError",
    "analyze",
    "build_channel_graph",
    "count_macs",
    "prune_whole_heads",
    "trace",
]
