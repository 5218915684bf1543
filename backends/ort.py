"""ONNX Runtime on CPU: the runner of the ``onnx`` backend, for parity checks and CPU latency.

ONNX Runtime is a hard dependency, so every export can be checked against torch on any
machine, GPU or not. Thread counts are fixed and reported because CPU latency without its
thread count is not comparable between runs or machines. Time it with
:func:`graphprune.backends.timing.measure`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from graphprune.frontend.modes import eval_mode
from graphprune.frontend.trace import as_inputs

from .onnx import flatten_outputs
from .timing import available_cpus, cpu_name, host_clock

__all__ = ["OrtRunner", "parity"]

_ORT_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class OrtRunner:
    """An InferenceSession on CPUExecutionProvider with a fixed, reported thread count.

    The intra-op pool does not spin while idle: when several sessions take turns (dense and
    pruned, interleaved), a spinning pool of the session that just ran steals the cores from
    the next one. Timed alone, spinning on or off gives the same latency.
    """

    backend = "onnxruntime"
    clock = staticmethod(host_clock)

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        self.threads: int | None = int(threads) if threads is not None else available_cpus()
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        # One op at a time: inter-op parallelism would make the reported thread count a lie.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only; warnings are about fusions it skipped
        self.session = ort.InferenceSession(
            str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device = cpu_name()

    def run(self, *arrays: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        """Run one forward pass; arrays are cast to the dtypes the graph declares."""
        if len(arrays) != len(self.input_names):
            raise ValueError(
                f"{self.path.name} takes {len(self.input_names)} inputs "
                f"({', '.join(self.input_names)}), got {len(arrays)}"
            )
        feeds = {
            spec.name: _to_numpy(a).astype(_dtype(spec.type), copy=False)
            for spec, a in zip(self.session.get_inputs(), arrays, strict=True)
        }
        return list(self.session.run(self.output_names, feeds))

    def step(self, batch_size: int) -> Callable[[], object]:
        """One forward pass on random inputs of ``batch_size``, bound once (for timing)."""
        feeds = dict(zip(self.input_names, self.random_inputs(batch_size), strict=True))
        return lambda: self.session.run(self.output_names, feeds)

    def random_inputs(self, batch_size: int, seed: int = 0) -> list[np.ndarray]:
        """Random inputs of the graph's dtypes and shapes, with the batch axis set.

        Only the leading axis may be symbolic: other dynamic axes have no size we could guess.
        """
        rng = np.random.default_rng(seed)
        arrays = []
        for spec in self.session.get_inputs():
            shape = [
                batch_size if i == 0 and not isinstance(d, int) else d
                for i, d in enumerate(spec.shape)
            ]
            if not all(isinstance(d, int) for d in shape):
                raise ValueError(
                    f"input {spec.name} of {self.path.name} has dynamic non-batch axes "
                    f"{spec.shape}; export with a fixed spatial size"
                )
            dtype = _dtype(spec.type)
            if np.issubdtype(dtype, np.floating):
                arrays.append(rng.standard_normal(shape).astype(dtype))
            else:
                arrays.append(np.zeros(shape, dtype=dtype))
        return arrays


def parity(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    onnx_path: str | Path,
) -> float:
    """Max absolute difference between torch (eval, no_grad) and ONNX Runtime, over all outputs.

    Every submodule's train/eval flag is restored afterwards. For an fp16 graph the inputs are
    cast to float16 for ONNX Runtime while torch runs the model as given, so the number includes
    the precision loss (which is the figure a user of the fp16 artifact cares about).
    """
    inputs = as_inputs(example_inputs)
    with torch.no_grad(), eval_mode(model):
        expected = flatten_outputs(model(*inputs))
    actual = OrtRunner(onnx_path).run(*inputs)
    if len(actual) != len(expected):
        raise ValueError(
            f"{Path(onnx_path).name} has {len(actual)} outputs, the model {len(expected)}"
        )
    diffs = [
        np.max(np.abs(a.astype(np.float64) - e.detach().cpu().double().numpy()), initial=0.0)
        for a, e in zip(actual, expected, strict=True)
    ]
    return float(max(diffs))


def _dtype(ort_type: str) -> type[np.generic]:
    try:
        return _ORT_DTYPES[ort_type]
    except KeyError:
        raise ValueError(f"unsupported ONNX input type {ort_type}") from None


def _to_numpy(a: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)
