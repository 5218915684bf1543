"""Every exception graphprune raises on purpose.

Each message names the node, module or file involved and says what to do about it.
"""

from __future__ import annotations


class GraphpruneError(Exception):
    """Base class: catch this to handle any graphprune failure."""


class InputError(GraphpruneError, ValueError):
    """An argument cannot work as given (empty batch, wrong device or dtype, bad option)."""


class TraceError(GraphpruneError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python).

    ``module_path`` names the innermost submodule whose forward failed, when known;
    ``mode_dependent`` says its code differs between train and eval mode (so every module of
    its class does, and may be kept as a leaf together).
    """

    def __init__(
        self, message: str = "", *, module_path: str | None = None, mode_dependent: bool = False
    ) -> None:
        super().__init__(message)
        self.module_path = module_path
        self.mode_dependent = mode_dependent


class UnsupportedOpError(GraphpruneError):
    """An op has no channel rule and ``strict=True`` was requested."""


class GraphInvariantError(GraphpruneError):
    """A pass found the graph in a state its preconditions forbid."""


class PlanError(GraphpruneError, ValueError):
    """A pruning plan or a compression target cannot be applied to the model's channel groups."""


class TargetMissedError(PlanError):
    """A method that trained ended above its MACs target (its masked channels did not decay in
    the budget). The trained and pruned work is not thrown away: ``result`` holds the
    CompressionResult (model and report, whose ``macs_ratio`` states what was reached), so a
    caller can keep it, fine-tune it further, or prune the rest with another method."""

    def __init__(self, message: str, *, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class BackendUnavailableError(GraphpruneError):
    """An optional backend (tensorrt, CUDA) is not installed or not usable here."""


class ExportError(GraphpruneError):
    """Exporting a model to a deployable format failed."""


class TrainingError(GraphpruneError):
    """Training diverged or cannot proceed (NaN loss, empty loader, corrupt checkpoint)."""


class ModelFileError(GraphpruneError, ValueError):
    """A model or checkpoint file cannot be written or read safely (unknown class, code in it,
    a pickled module from an older version, a truncated file)."""
