"""graphprune: a graph-level structured-pruning compiler for PyTorch CNNs."""

from .analysis import ChannelGroup, analyze, build_channel_graph
from .api import CompressionResult, compress, export
from .errors import (
    BackendUnavailableError,
    ExportError,
    GraphInvariantError,
    GraphpruneError,
    PlanError,
    TraceError,
    TrainingError,
    UnsupportedOpError,
)
from .macs import MacsReport, count_macs
from .tracing import trace

__all__ = [
    "CompressionResult",
    "compress",
    "export",
    "BackendUnavailableError",
    "ChannelGroup",
    "ExportError",
    "GraphInvariantError",
    "GraphpruneError",
    "MacsReport",
    "PlanError",
    "TraceError",
    "TrainingError",
    "UnsupportedOpError",
    "analyze",
    "build_channel_graph",
    "count_macs",
    "trace",
]
