"""Export a (pruned) model to one self-contained ONNX file that TensorRT and ONNX Runtime accept.

Why each step exists:

- ``dynamo=True`` (torch.export based) is torch's maintained exporter; ``legacy=True`` keeps the
  TorchScript exporter for older TensorRT parsers that reject what the new one emits.
- A dynamic batch axis on every input and output lets one file (and one engine profile) serve
  batch 1 latency and batch 16 throughput.
- One file, no ``.data`` side-car: artifacts get copied around, and a lost side-car makes a
  model that loads but has no weights.
- onnx-graphsurgeon cleanup (constant folding, no-op removal, toposort) gives parsers a smaller
  graph, and shape inference + the checker catch a broken graph here rather than in a runtime.
- ``fp16=True`` bakes half precision into the graph, because TensorRT 11 is strongly typed:
  precision comes from tensor types in the ONNX file, not from builder flags.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from graphprune.errors import ExportError
from graphprune.frontend.trace import as_inputs

from .base import Backend, Runner, register_backend

__all__ = ["OnnxBackend", "cleanup_onnx", "export_onnx", "graph_precision", "io_names"]

BATCH_AXIS_NAME = "batch"


def io_names(n_inputs: int, n_outputs: int) -> tuple[list[str], list[str]]:
    """Stable I/O tensor names: ``input``/``output``, or ``input_0``... when there are several.

    Fixed names make trtexec shape flags and runner feeds predictable across exports.
    """
    ins = ["input"] if n_inputs == 1 else [f"input_{i}" for i in range(n_inputs)]
    outs = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    return ins, outs


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | Path,
    *,
    fp16: bool = False,
    dynamic_batch: bool = True,
    legacy: bool = False,
    opset: int | None = None,
) -> Path:
    """Export ``model`` to a single cleaned, checked ONNX file at ``path`` and return the path.

    The model is deep-copied and put in eval mode; the caller's model is never mutated.
    With ``fp16=True`` the copy and the floating-point inputs are cast to half before export,
    so the graph's floating inputs, outputs and weights are float16: feed it float16 arrays.
    Otherwise inputs and outputs keep the example inputs' dtypes (normally float32).

    Raises ExportError naming the path when it cannot be written, and naming the failing op
    (and what to try) when the exporter fails.
    """
    path = Path(path)
    _check_writable(path)
    # The exporter announces every torchvision op it cannot register; we never use them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    inputs = as_inputs(example_inputs)
    work = copy.deepcopy(model).eval()
    with torch.no_grad():
        n_outputs = len(flatten_outputs(work(*inputs)))
    if fp16:
        work = work.half()
        inputs = tuple(t.half() if t.is_floating_point() else t for t in inputs)
    in_names, out_names = io_names(len(inputs), n_outputs)

    with tempfile.TemporaryDirectory(prefix="graphprune-onnx-") as tmp:
        raw = Path(tmp) / "model.onnx"
        try:
            with warnings.catch_warnings():
                # The exporters warn about their own deprecations on every call; not actionable.
                warnings.simplefilter("ignore", category=DeprecationWarning)
                warnings.simplefilter("ignore", category=FutureWarning)
                _run_exporter(work, inputs, raw, in_names, out_names, dynamic_batch, legacy, opset)
        except Exception as exc:
            raise ExportError(_explain_failure(model, exc, legacy, opset)) from exc
        # onnx.load pulls in any external-data side-car the exporter wrote into the temp folder,
        # so the proto we save below carries every tensor inline.
        proto = onnx.load(str(raw))

    precision = "fp16" if fp16 else "fp32"
    proto = cleanup_onnx(proto)
    onnx.helper.set_model_props(
        proto,
        {
            **{p.key: p.value for p in proto.metadata_props},
            "graphprune.precision": precision,
            "graphprune.exporter": "torchscript" if legacy else "dynamo",
        },
    )
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ExportError(
            f"the ONNX graph exported from {type(model).__name__} fails onnx's checker: {exc}. "
            "Try legacy=True, or a different opset."
        ) from exc
    try:
        onnx.save_model(proto, str(path), save_as_external_data=False)
    except (OSError, ValueError) as exc:
        # ValueError: protobuf refuses models over 2 GiB, which cannot be a single file.
        raise ExportError(f"cannot write the ONNX file {path}: {exc}") from exc
    return path


def cleanup_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants and drop no-op nodes, returning a new, topologically sorted model.

    Removed: Identity, inference-mode Dropout, and Cast to the dtype the tensor already has.
    A no-op that produces a graph output is removed by renaming its producer's output to the
    graph output name, so output names stay as exported; it is kept only when its input is a
    graph input, a constant or another graph output (a graph output must come from a node).
    """
    graph = gs.import_onnx(model)
    graph.toposort()
    graph.fold_constants()
    graph.cleanup()
    for node in list(graph.nodes):
        if _is_noop(node):
            _bypass(graph, node)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    # Keep the exporter's IR version: parsers (TensorRT's included) reject ones newer than they
    # know, and onnx-graphsurgeon would otherwise stamp the installed onnx's latest.
    out.ir_version = model.ir_version
    onnx.helper.set_model_props(out, {p.key: p.value for p in model.metadata_props})
    return out


def graph_precision(model: onnx.ModelProto) -> str:
    """``"fp16"`` when the graph computes in half precision (any float16 input or weight)."""
    half = onnx.TensorProto.FLOAT16
    if any(i.type.tensor_type.elem_type == half for i in model.graph.input):
        return "fp16"
    return "fp16" if any(t.data_type == half for t in model.graph.initializer) else "fp32"


def _run_exporter(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    raw: Path,
    in_names: list[str],
    out_names: list[str],
    dynamic_batch: bool,
    legacy: bool,
    opset: int | None,
) -> None:
    params = inspect.signature(torch.onnx.export).parameters
    kwargs: dict[str, Any] = {
        "input_names": in_names,
        "output_names": out_names,
        "opset_version": opset,
    }
    if legacy:
        if "dynamo" in params:
            kwargs["dynamo"] = False
        if dynamic_batch:
            kwargs["dynamic_axes"] = {n: {0: BATCH_AXIS_NAME} for n in in_names + out_names}
        torch.onnx.export(model, inputs, str(raw), do_constant_folding=True, **kwargs)
        return
    if "dynamo" not in params:
        raise RuntimeError("this torch has no torch.export-based ONNX exporter (needs torch>=2.5)")
    kwargs.update(dynamo=True, verbose=False)
    if "external_data" in params:
        kwargs["external_data"] = False
    if dynamic_batch:
        batch = torch.export.Dim(BATCH_AXIS_NAME)
        kwargs["dynamic_shapes"] = tuple({0: batch} for _ in inputs)
        # torch.export specializes size-1 dims to constants, which would freeze the batch at 1.
        inputs = tuple(t.expand(2, *t.shape[1:]).clone() if t.shape[0] == 1 else t for t in inputs)
    torch.onnx.export(model, inputs, str(raw), **kwargs)


def _is_noop(node: gs.Node) -> bool:
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        mask_used = len(node.outputs) > 1 and bool(node.outputs[1].outputs)
        training = node.inputs[2] if len(node.inputs) > 2 else None
        training_off = training is None or (
            isinstance(training, gs.Constant) and not bool(np.asarray(training.values))
        )
        return not mask_used and training_off
    if node.op == "Cast" and node.inputs[0].dtype is not None:
        target = onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"])
        try:
            return np.dtype(node.inputs[0].dtype) == target
        except TypeError:  # an ONNX-only dtype (bfloat16, float8) that numpy cannot name
            return False
    return False


def _bypass(graph: gs.Graph, node: gs.Node) -> None:
    """Rewire consumers of ``node``'s output to its input so cleanup() can drop the node."""
    src, dst = node.inputs[0], node.outputs[0]
    if dst in graph.outputs:
        if src in graph.inputs or src in graph.outputs or not src.inputs:
            return
        producer = src.inputs[0]
        for consumer in list(src.outputs):
            if consumer is not node:
                consumer.inputs[consumer.inputs.index(src)] = dst
        node.outputs.clear()
        node.inputs.clear()
        producer.outputs[producer.outputs.index(src)] = dst
        return
    for consumer in list(dst.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is dst:
                consumer.inputs[i] = src
    node.outputs.clear()


def _check_writable(path: Path) -> None:
    """Fail before a slow export when the destination cannot be written."""
    from graphprune.io import check_writable

    try:
        check_writable(path)
    except OSError as exc:
        raise ExportError(
            f"cannot write the ONNX file {path}: {exc}. Choose a writable path."
        ) from exc


def flatten_outputs(out: object) -> list[torch.Tensor]:
    """All tensors of a model output (tensor, nested tuples/lists, dicts), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in flatten_outputs(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in flatten_outputs(item)]
    raise ExportError(f"model output of type {type(out).__name__} is not a tensor; cannot export")


_OP_PATTERNS = (
    re.compile(r"operator '(aten::\w+)'"),
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.:]+)'"),
    re.compile(r"target=(torch\.ops\.[\w.]+)"),
    re.compile(r"\b(aten(?:::|\.)\w+)"),
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CALL_SITE = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)')


def _explain_failure(model: nn.Module, exc: Exception, legacy: bool, opset: int | None) -> str:
    """Say which op or source line broke the export, and what to try next."""
    text = str(exc)
    if exc.__cause__ is not None:
        text += "\n" + str(exc.__cause__)
    text = _ANSI.sub("", text)
    where = ""
    for pattern in _OP_PATTERNS:
        if m := pattern.search(text):
            where = f" at op {m.group(1)}"
            break
    if m := _CALL_SITE.search(text):
        where += f" (called from {m.group(1)}:{m.group(2)} in {m.group(3)}: {m.group(4).strip()})"
    # The dynamo exporter puts the root cause under "## Exception summary"; prefer that line.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    summary = next(
        (lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln == "## Exception summary"),
        lines[0] if lines else type(exc).__name__,
    )
    hints = []
    if "data-dependent" in text:
        hints.append("making that control flow independent of tensor values (torch.cond)")
    if not legacy:
        hints.append("legacy=True (the TorchScript exporter)")
    hints.append(f"an opset newer than {opset}" if opset else "a newer opset (e.g. opset=21)")
    hints.append("replacing the op with a supported equivalent")
    return (
        f"exporting {type(model).__name__} to ONNX failed{where}: {summary[:300]}. "
        f"Try {', or '.join(hints)}."
    )


@register_backend
class OnnxBackend(Backend):
    """One cleaned, checked .onnx file (:func:`export_onnx`), run with ONNX Runtime on CPU."""

    name = "onnx"
    suffix = ".onnx"
    description = "one cleaned, checked ONNX file, run with ONNX Runtime on CPU"

    def export(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor | Sequence[torch.Tensor],
        path: str | Path,
        *,
        fp16: bool = False,
        batch_sizes: Sequence[int] | None = None,
        **options: Any,
    ) -> Path:
        """See :func:`export_onnx` (options: dynamic_batch, legacy, opset). The batch axis is
        dynamic, so ``batch_sizes`` needs nothing here."""
        return export_onnx(model, example_inputs, path, fp16=fp16, **options)

    def runner(
        self, artifact: str | Path | nn.Module, *, threads: int | None = None, **options: Any
    ) -> Runner:
        """An :class:`~.ort.OrtRunner` at ``threads`` intra-op threads (default: all CPUs)."""
        from .ort import OrtRunner

        return OrtRunner(self.artifact_path(artifact), threads=threads, **options)
