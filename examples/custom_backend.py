"""Adding a backend: torch.export programs (.pt2) as a graphprune backend, in one class.

Importing this module registers the backend; from then on ``graphprune.backends.export(...,
backend="torch_export")``, ``graphprune export --backend torch_export``, ``graphprune bench
--backend torch_export`` and :func:`graphprune.backends.timing.measure` all work with it.

    python examples/custom_backend.py      # exports a zoo model, checks it, times it
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphprune.backends import Backend, measure, register_backend
from graphprune.backends.onnx import flatten_outputs
from graphprune.backends.timing import cpu_name, host_clock


class ExportedProgramRunner:
    """The Runner protocol: backend, device, threads, clock, run(), step(batch_size)."""

    backend = "torch.export"
    clock = staticmethod(host_clock)  # CPU: wall time of one call

    def __init__(self, path: Path) -> None:
        program = torch.export.load(str(path))
        self.module = program.module()
        self.example = program.example_inputs[0][0].shape[1:]  # saved with the program
        self.device, self.threads = cpu_name(), torch.get_num_threads()

    def run(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return flatten_outputs(self.module(*inputs))

    def step(self, batch_size: int) -> Callable[[], object]:
        x = torch.randn(batch_size, *self.example)
        return functools.partial(self.run, x)


@register_backend
class TorchExportBackend(Backend):
    """A torch.export program with a dynamic batch axis, run by PyTorch on CPU."""

    name = "torch_export"
    suffix = ".pt2"
    description = "a torch.export program (.pt2), run by PyTorch on CPU"

    def export(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor | Sequence[torch.Tensor],
        path: str | Path,
        *,
        fp16: bool = False,
        batch_sizes: Sequence[int] | None = None,  # any batch runs: the axis is dynamic
        **options: Any,
    ) -> Path:
        if fp16 or options:
            raise ValueError(f"{self.name} takes no export options, got fp16={fp16}, {options}")
        (x,) = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
        work = copy.deepcopy(model).eval()  # never mutate the caller's model
        x2 = x[:1].expand(2, *x.shape[1:]).clone()  # batch 1 would be frozen as a constant
        batch = {0: torch.export.Dim("batch")}
        program = torch.export.export(work, (x2,), dynamic_shapes=(batch,))
        torch.export.save(program, str(path))
        return Path(path)

    def runner(
        self, artifact: str | Path | nn.Module, *, threads: int | None = None
    ) -> ExportedProgramRunner:
        if threads is not None:
            torch.set_num_threads(threads)  # torch has one intra-op pool per process
        return ExportedProgramRunner(self.artifact_path(artifact))


def main() -> dict[str, float]:
    import tempfile

    from graphprune.backends import export, runner
    from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE

    model = ZOO["resnet_basic"]().eval()
    x = torch.randn(ZOO_INPUT_SHAPE)
    with tempfile.TemporaryDirectory() as tmp:
        path = export(model, x, Path(tmp) / "model.pt2", backend="torch_export")
        loaded = runner(path)  # the backend is found by the file's suffix
        with torch.no_grad():
            diff = (loaded.run(x)[0] - model(x)).abs().max().item()
        stats = measure([loaded], (1, 4), warmup=2, rounds=10).stats
    print(f"max abs diff {diff:.1e}; batch 4 median {stats[4][0].median_ms:.2f} ms")
    return {"max_abs_diff": diff, "median_ms_b4": stats[4][0].median_ms}


if __name__ == "__main__":
    main()
