"""Train and eval mode: switching a model to eval without losing per-module flags, and
making a traced graph follow the mode like the original does."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch
from torch import fx, nn

from graphprune.errors import TraceError

_TORCH_DIR = str(Path(torch.__file__).parent)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; afterwards every submodule gets its own flag back.

    ``model.train(was_training)`` would reset all submodules to the root's flag and undo a
    user's frozen (eval-mode) BatchNorms.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def bind_training_flags(
    model: nn.Module, graph: fx.Graph, retrace: Callable[[bool], fx.Graph]
) -> None:
    """Make ``graph`` (traced from ``model`` as its flags are) behave like ``model`` in both
    train and eval mode, or refuse.

    A graph freezes ``self.training`` as it was when traced. ``model`` is traced again with
    every module in its other mode (``retrace(record_stack_traces)`` traces it as its flags are
    now). Same graphs: nothing depends on the mode. Graphs that differ only in boolean
    arguments that flip with the mode (``F.dropout(x, p, self.training)``, torchvision's
    ``stochastic_depth(..., self.training)``): those arguments are bound to the owning
    module's ``training`` flag at run time (a ``get_attr`` node), so ``.train()``/``.eval()``
    act on the traced model as on the original. Anything else (``if self.training:``) raises
    TraceError naming the line; a leaf module runs its own forward, so it is the fix.
    """

    def flipped(stack_traces: bool) -> fx.Graph:
        flags = [(m, m.training) for m in model.modules()]
        for m, training in flags:  # each module flipped, so every flag read shows as a change
            m.training = not training
        try:
            return retrace(stack_traces)
        finally:
            for m, training in flags:
                m.training = training

    ours, theirs = list(graph.nodes), list(flipped(False).nodes)
    rename = _align_constants(model, ours, theirs)
    if [_key(n) for n in ours] == [_key(n, rename) for n in theirs]:
        return
    literals = _mode_literals(ours, theirs, rename)
    if literals is None:
        _refuse(model, retrace(True), flipped(True))
    flag_nodes: dict[str, fx.Node] = {}
    for node, where in literals:
        path = _owner_path(node)
        target = f"{path}.training" if path else "training"
        if target not in flag_nodes:
            with graph.inserting_before(node):
                flag_nodes[target] = graph.get_attr(target)
        if isinstance(where, int):
            args = list(node.args)
            args[where] = flag_nodes[target]
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, where: flag_nodes[target]}


# Tensors a forward creates (torch.tensor(...), a plain tensor attribute) become attributes
# of the traced root named by a counter, so a second trace of the same model numbers them on.
_CONSTANT = re.compile(r"_(?:tensor|param)_constant\d+")


def _align_constants(
    model: nn.Module, ours: list[fx.Node], theirs: list[fx.Node]
) -> dict[str, str]:
    """Their constant names -> ours, pairing constants in order of appearance; only pairs
    holding equal tensors (an unpaired or different constant stays a difference)."""
    names = [
        [str(n.target) for n in nodes if n.op == "get_attr" and _CONSTANT.fullmatch(str(n.target))]
        for nodes in (ours, theirs)
    ]
    rename = {}
    for a, b in zip(*names, strict=False):
        x, y = getattr(model, a, None), getattr(model, b, None)
        same = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
        if same and x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y):
            rename[b] = a
    return rename


def _renamed(text: str, rename: dict[str, str] | None) -> str:
    if not rename:
        return text
    return _CONSTANT.sub(lambda m: rename.get(m.group(0), m.group(0)), text)


def _key(n: fx.Node, rename: dict[str, str] | None = None) -> tuple:
    return tuple(_renamed(t, rename) for t in (n.op, str(n.target), str(n.args), str(n.kwargs)))


def _mode_literals(
    ours: list[fx.Node], theirs: list[fx.Node], rename: dict[str, str] | None = None
) -> list[tuple] | None:
    """(node, arg index or kwarg name) of every boolean argument that is the only difference
    between the two graphs and flips with the mode; None if anything else differs."""
    if len(ours) != len(theirs):
        return None
    found = []
    for a, b in zip(ours, theirs, strict=True):
        if (a.op, str(a.target), a.name) != tuple(
            _renamed(t, rename) for t in (b.op, str(b.target), b.name)
        ):
            return None
        if len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
            return None
        pairs = [(i, x, y) for i, (x, y) in enumerate(zip(a.args, b.args, strict=True))]
        pairs += [(k, a.kwargs[k], b.kwargs[k]) for k in a.kwargs]
        for where, x, y in pairs:
            if str(x) == _renamed(str(y), rename):
                continue
            if not (isinstance(x, bool) and isinstance(y, bool) and x != y):
                return None
            found.append((a, where))
    return found


def _owner_path(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _owner_class(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    cls = list(stack.values())[-1][1]
    return cls.__name__ if isinstance(cls, type) else str(cls).rpartition(".")[2].strip("'>")


def _refuse(model: nn.Module, our_graph: fx.Graph, their_graph: fx.Graph) -> NoReturn:
    """Name the first op that differs (not a module call: those differ only as users), or
    the module that calls different submodules in the two modes.

    A boolean argument that only flips with the mode (``F.batch_norm(..., training=...)``)
    is not the culprit: ``bind_training_flags`` binds those once the rest agrees. Blaming it
    froze every BatchNormAct2d of timm's EfficientFormerV2, whose real mode-dependent code
    is its attention's bias cache."""
    ours, theirs = list(our_graph.nodes), list(their_graph.nodes)
    rename = _align_constants(model, ours, theirs)
    i = next(
        i
        for i in range(max(len(ours), len(theirs)))
        if i >= min(len(ours), len(theirs))
        or (
            _key(ours[i]) != _key(theirs[i], rename)
            and _mode_literals([ours[i]], [theirs[i]], rename) is None
        )
    )
    a = ours[i] if i < len(ours) else None
    b = theirs[i] if i < len(theirs) else None
    # The op in the innermost module: code that only one mode runs (a DropPath's sampling)
    # shows as a node of that module in one graph and as its caller's next op in the other.
    ops = [n for n in (a, b) if n is not None and n.op in ("call_function", "call_method")]
    culprit = max(ops, key=_depth) if ops else (a or b)
    where = _user_line(culprit.stack_trace) if culprit is not None else ""
    owner = _owner_class(culprit) if culprit is not None else ""
    owner_path = _owner_path(culprit) if culprit is not None else ""
    chooser = _chooser(a, b, our_graph, their_graph)
    if chooser is not None:  # the two modes run different children: their parent chose
        owner_path = chooser
        owner = type(model.get_submodule(chooser)).__name__ if chooser else type(model).__name__
        where = f" in {owner}.forward (it calls different submodules in the two modes)"
    modes = ("train", "eval") if model.training else ("eval", "train")
    in_child = bool(owner) and owner != type(model).__name__
    hint = (
        f"pass leaf_modules=[{owner}] (a leaf runs its own forward in the current mode; "
        "its channels become unprunable)"
        if in_child
        else "move the mode-dependent code into a submodule and pass it as leaf_modules=[...]"
    )
    raise TraceError(
        f"{type(model).__name__} computes differently in train and eval mode{where}: traced "
        f"in {modes[0]} mode it runs {_fmt(a)}, in {modes[1]} mode {_fmt(b)}. A traced graph "
        f"freezes one mode, so the result would not behave like the original in both.\n"
        f"  fix: {hint}",
        # The submodule whose own code depends on the mode: frontend.fallback freezes it.
        module_path=(owner_path or None) if in_child and culprit is not None else None,
        mode_dependent=True,
    )


def _module_of(n: fx.Node) -> str:
    """The module a node runs in: a module call's own path, else its innermost owner."""
    return str(n.target) if n.op == "call_module" else _owner_path(n)


def _chooser(a: fx.Node | None, b: fx.Node | None, ga: fx.Graph, gb: fx.Graph) -> str | None:
    """Where the first difference runs in a child of one module that the other mode never
    calls (GoogLeNet's forward calls its auxiliary head in train mode only): that module's
    path ("" for the model itself), whose own code chose. None when one of the two ops is
    that module's own (a DropPath's sampling against its caller's add), or both children run
    in both modes (one of them computes differently itself): the deeper op is the culprit."""
    if a is None or b is None:
        return None
    pa, pb = _module_of(a).split("."), _module_of(b).split(".")
    if pa == [""] or pb == [""]:
        return None
    common = []
    for x, y in zip(pa, pb, strict=False):
        if x != y:
            break
        common.append(x)
    if len(common) >= min(len(pa), len(pb)):
        return None  # one runs in the other's module
    child_a, child_b = ".".join(pa[: len(common) + 1]), ".".join(pb[: len(common) + 1])
    called_a = getattr(ga, "called_modules", frozenset())
    called_b = getattr(gb, "called_modules", frozenset())
    if child_a in called_b and child_b in called_a:
        return None
    return ".".join(common)


def _depth(n: fx.Node) -> int:
    return len(n.meta.get("nn_module_stack") or {})


def _fmt(n: fx.Node | None) -> str:
    return "nothing more" if n is None else (n.format_node() or f"{n.op} {n.target}")


def _user_line(stack_trace: str | None) -> str:
    """The last frame of a node's recorded stack that is not torch's own code."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', stack_trace or "")
    user = [f for f in frames if not f[0].startswith(_TORCH_DIR)]
    if not user:
        return ""
    file, line, code = user[-1]
    return f" at {file}:{line}: {code.strip()}"
