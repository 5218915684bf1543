"""A model as data: a JSON structure description plus named tensors, rebuilt without running
code from the file.

Why not pickle (``torch.save(model)``): unpickling calls whatever the file names, so opening a
stranger's model file runs the stranger's code. Why not weights alone: a pruned model's layer
widths differ from the original's, and its forward is an fx graph, not a class's source. Why
not torch.export's archive: it stores aten-level graphs without the module tree, so the loaded
model could no longer be traced by graphprune, analyzed or trained (BatchNorm modes are frozen).

So a model is described as

- a module tree: each module's class, named from an allow-list (the ``torch.nn`` layers,
  graphprune's own modules, and the classes the caller passes as ``extra_modules``), its plain
  attributes (numbers, strings, tuples, dtypes, ...), and references to its parameters and
  buffers (a Parameter shared by two modules is stored once and shared again on load);
- for each fx.GraphModule, its graph as a list of nodes whose call targets come from an
  allow-list of tensor operations: torch / torch.nn.functional / Tensor methods that torch
  itself lists as overridable tensor functions, arithmetic from ``operator``, and ``getattr``
  of tensor properties. Anything else (a hook, a callable attribute, an unknown function) is
  refused when saving and when loading, with the module or node named.

Loading builds modules with ``cls.__new__`` plus ``nn.Module.__init__`` (the way unpickling a
module does, but only for allow-listed classes) and lets fx generate the forward code from the
validated nodes; no text from the file is ever executed or imported.
"""

from __future__ import annotations

import keyword
import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import get_overridable_functions

from graphprune.errors import ModelFileError

_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
_OPERATORS = (
    "add sub mul truediv floordiv mod pow matmul neg pos abs invert not_ and_ or_ xor "
    "lshift rshift eq ne lt le gt ge getitem iadd isub imul itruediv ifloordiv"
).split()
# Tensor methods that take a callable or leave the tensor world: never in a model file.
_DENIED_METHODS = frozenset(
    "register_hook register_post_accumulate_grad_hook apply_ map_ map2_ storage "
    "untyped_storage numpy data_ptr backward share_memory_ pin_memory".split()
)
_DENIED_PROPERTIES = frozenset({"grad_fn", "grad", "_base"})


def _tensor_ops() -> tuple[dict[str, object], frozenset[str], frozenset[str]]:
    found = get_overridable_functions()
    functions: dict[str, object] = {f"operator.{n}": getattr(operator, n) for n in _OPERATORS}
    functions["builtins.getattr"] = getattr
    for ns, prefix in ((torch, "torch"), (F, "torch.nn.functional")):
        for fn in found.get(ns, ()):
            name = getattr(fn, "__name__", "")
            if name and not name.startswith("_") and getattr(ns, name, None) is fn:
                functions[f"{prefix}.{name}"] = fn
    tensor = [getattr(f, "__name__", "") for f in found.get(torch.Tensor, ())]
    methods = {
        n
        for n in tensor
        if n and not n.startswith("_") and callable(getattr(torch.Tensor, n, None))
    }
    descriptors = (property, type(torch.Tensor.shape))
    props = {
        n
        for n in dir(torch.Tensor)
        if not n.startswith("_") and isinstance(getattr(torch.Tensor, n, None), descriptors)
    }
    return (
        functions,
        frozenset(methods - _DENIED_METHODS),
        frozenset(props - _DENIED_PROPERTIES | {"shape"}),
    )


FUNCTIONS, METHODS, PROPERTIES = _tensor_ops()
_FUNCTION_NAMES = {id(f): n for n, f in FUNCTIONS.items()}


def _allowed_classes(extra: Iterable[type[nn.Module]]) -> dict[str, type[nn.Module]]:
    from graphprune.passes.compactor import Compactor

    out: dict[str, type[nn.Module]] = {"torch.nn.Module": nn.Module}
    for name in dir(nn):
        cls = getattr(nn, name)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and not name.startswith("_"):
            out[f"torch.nn.{name}"] = cls
    for cls in (Compactor, *extra):
        out[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return out


class UnlistedClassError(ModelFileError):
    """A module's class is not on the allow-list (its forward is code the file cannot hold)."""


def check_no_hooks(model: nn.Module) -> None:
    """Hooks are code: a model that has any cannot be stored as data."""
    for path, m in model.named_modules():
        for name in _MODULE_INTERNALS:
            if "hook" in name and getattr(m, name):
                raise ModelFileError(
                    f"module {path or '<root>'!r} has hooks registered ({name}); hooks are code "
                    "and cannot be stored in a model file: remove them before saving"
                )


def _class_key(cls: type, allowed: dict[str, type[nn.Module]], where: str) -> str:
    for key, c in allowed.items():
        if c is cls:
            return key
    raise UnlistedClassError(
        f"module {where!r} is a {cls.__module__}.{cls.__qualname__}, which is not a torch.nn "
        "layer: its code cannot be stored as data. Pass the class as extra_modules=[...] to "
        "both save_model and load_model (it is then imported from your code, not the file)"
    )


# --- values ------------------------------------------------------------------------------------
class _Encoder:
    """Plain values to JSON, with tagged objects; tensors go to ``tensors`` by identity."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._ids: dict[int, str] = {}

    def tensor(self, t: torch.Tensor, name: str) -> str:
        key = self._ids.get(id(t))
        if key is None:
            key = self._ids[id(t)] = name
            self.tensors[key] = t.detach()
        return key

    def value(self, v: object, where: str) -> object:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, fx.Node):
            return {"$node": v.name}
        if isinstance(v, torch.Tensor):
            return {"$tensor": self.tensor(v, where)}
        if isinstance(v, (list, tuple)):
            items = [self.value(x, f"{where}[{i}]") for i, x in enumerate(v)]
            return items if type(v) is list else {"$tuple": items}
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            return {"$dict": {k: self.value(x, f"{where}.{k}") for k, x in v.items()}}
        if isinstance(v, slice):
            return {"$slice": [self.value(x, where) for x in (v.start, v.stop, v.step)]}
        if v is Ellipsis:
            return {"$ellipsis": True}
        for tag, kind in (("dtype", torch.dtype), ("layout", torch.layout)):
            if isinstance(v, kind):
                return {f"${tag}": str(v).removeprefix("torch.")}
        if isinstance(v, torch.memory_format):
            return {"$memory_format": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"$device": str(v)}
        raise ModelFileError(
            f"{where} is a {type(v).__name__}, which a model file cannot hold as data "
            "(numbers, strings, tuples, dtypes, devices and tensors only)"
        )


def _decode(v: object, tensors: dict[str, torch.Tensor], nodes: dict[str, fx.Node]) -> object:
    if isinstance(v, list):
        return [_decode(x, tensors, nodes) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) != 1:
        raise ModelFileError(f"malformed value {str(v)[:80]} in the structure description")
    ((tag, x),) = v.items()
    if tag == "$node":
        return nodes[x]
    if tag == "$tensor":
        return tensors[x]
    if tag == "$tuple":
        return tuple(_decode(i, tensors, nodes) for i in x)
    if tag == "$dict":
        return {k: _decode(i, tensors, nodes) for k, i in x.items()}
    if tag == "$slice":
        return slice(*(_decode(i, tensors, nodes) for i in x))
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$device":
        return torch.device(x)
    kinds = {"$dtype": torch.dtype, "$layout": torch.layout, "$memory_format": torch.memory_format}
    if tag in kinds and isinstance(getattr(torch, str(x), None), kinds[tag]):
        return getattr(torch, x)
    raise ModelFileError(f"unknown value {tag}={str(x)[:40]!r} in the structure description")


# --- modules -----------------------------------------------------------------------------------
def describe(
    model: nn.Module, *, extra_modules: Iterable[type[nn.Module]] = ()
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-safe structure, tensors by name) for ``model``; raises ModelFileError naming the
    module or node that cannot be stored as data."""
    check_no_hooks(model)
    allowed, enc = _allowed_classes(extra_modules), _Encoder()
    return _describe(model, "", allowed, enc), enc.tensors


def _describe(m: nn.Module, path: str, allowed, enc: _Encoder) -> dict:
    where = path or "<root>"
    is_graph = isinstance(m, fx.GraphModule)
    out: dict = {"class": "fx.GraphModule" if is_graph else _class_key(type(m), allowed, where)}
    out["training"] = m.training
    prefix = f"{path}." if path else ""
    out["params"] = {
        n: None if p is None else [enc.tensor(p, prefix + n), p.requires_grad]
        for n, p in m._parameters.items()
    }
    out["buffers"] = {
        n: None
        if b is None
        else [enc.tensor(b, prefix + n), n not in m._non_persistent_buffers_set]
        for n, b in m._buffers.items()
    }
    out["children"] = {
        n: None if c is None else _describe(c, prefix + n, allowed, enc)
        for n, c in m._modules.items()
    }
    if is_graph:
        out["name"] = type(m).__name__
        out["graph"] = [_describe_node(n, enc, where) for n in m.graph.nodes]
        out["attrs"] = {}  # everything else on a GraphModule is derived from its graph
    else:
        out["attrs"] = {
            k: enc.value(v, f"{where}.{k}")
            for k, v in vars(m).items()
            if k not in _MODULE_INTERNALS and k != "training"
        }
    return out


def _describe_node(n: fx.Node, enc: _Encoder, where: str) -> dict:
    target: object = n.target
    if n.op == "call_function":
        target = _FUNCTION_NAMES.get(id(n.target))
        if target is None:
            raise ModelFileError(
                f"node {n.name!r} of {where} calls {n.target!r}, which is not a tensor "
                "operation graphprune can store as data (torch, torch.nn.functional, operator)"
            )
    at = f"node {n.name!r}"
    return {
        "name": n.name,
        "op": n.op,
        "target": target,
        "args": enc.value(n.args, at),
        "kwargs": enc.value(dict(n.kwargs), at),
    }


def build(
    structure: dict,
    tensors: dict[str, torch.Tensor],
    *,
    extra_modules: Iterable[type[nn.Module]] = (),
) -> nn.Module:
    """The model ``describe`` described, built only from allow-listed classes and ops."""
    shared: dict[str, torch.Tensor] = {}
    return _build(structure, tensors, _allowed_classes(extra_modules), shared, "<root>")


def _build(d: dict, tensors, allowed, shared: dict, where: str) -> nn.Module:
    try:
        key = d["class"]
        is_graph = key == "fx.GraphModule"
        cls = nn.Module if is_graph else allowed.get(key)
        if cls is None:
            raise ModelFileError(
                f"module {where!r} is a {key}, which is not allow-listed: if it is your own "
                "class, pass it as extra_modules=[...] to load_model"
            )
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for name, value in d["attrs"].items():
            if not name.isidentifier() or name.startswith("__"):
                raise ModelFileError(f"module {where!r} has an invalid attribute name {name!r}")
            object.__setattr__(m, name, _decode(value, tensors, {}))
        m.training = bool(d["training"])
        for name, ref in d["params"].items():
            p = None if ref is None else _shared(shared, tensors, ref[0], bool(ref[1]), True)
            m.register_parameter(_identifier(name, where), p)
        for name, ref in d["buffers"].items():
            b = None if ref is None else _shared(shared, tensors, ref[0], False, False)
            m.register_buffer(_identifier(name, where), b, persistent=bool(ref and ref[1]))
        for name, child in d["children"].items():
            sub = None if child is None else _build(child, tensors, allowed, shared, name)
            m.add_module(_identifier(name, where), sub)
        if is_graph:
            return _graph_module(m, d, tensors, where)
        return m
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ModelFileError(f"malformed description of module {where!r}: {exc!r}") from exc


def _identifier(name: str, where: str) -> str:
    if not (name.isidentifier() or name.isdigit()) or name.startswith("__"):
        raise ModelFileError(f"module {where!r} has an invalid member name {name!r}")
    return name


def _shared(shared: dict, tensors, key: str, requires_grad: bool, param: bool):
    if key not in shared:
        t = tensors[key]
        shared[key] = nn.Parameter(t, requires_grad=requires_grad) if param else t
    return shared[key]


def _graph_module(root: nn.Module, d: dict, tensors, where: str) -> fx.GraphModule:
    graph, nodes = fx.Graph(), {}
    for spec in d["graph"]:
        name, op, target = spec["name"], spec["op"], spec["target"]
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ModelFileError(f"{where}: invalid node name {name!r}")
        if op == "call_function":
            if target not in FUNCTIONS:
                raise ModelFileError(f"{where}: node {name!r} calls {target!r}, not allow-listed")
            target = FUNCTIONS[target]
        elif op == "call_method":
            if target not in METHODS:
                raise ModelFileError(
                    f"{where}: node {name!r} calls method {target!r}, not an allow-listed "
                    "tensor method"
                )
        elif op in ("call_module", "get_attr"):
            if not all(_identifier(part, where) for part in str(target).split(".")):
                raise ModelFileError(f"{where}: node {name!r} has an invalid target {target!r}")
        elif op == "placeholder":
            _identifier(str(target), where)
        elif op != "output":
            raise ModelFileError(f"{where}: node {name!r} has an unknown op {op!r}")
        args = _decode(spec["args"], tensors, nodes)
        kwargs = _decode(spec["kwargs"], tensors, nodes)
        if target is getattr and not (
            len(args) == 2 and isinstance(args[1], str) and args[1] in PROPERTIES
        ):
            raise ModelFileError(f"{where}: node {name!r} reads an attribute that is not allowed")
        nodes[name] = graph.create_node(op, target, tuple(args), kwargs, name=name)
    graph.lint()
    cls_name = d.get("name", "GraphModule")
    if not isinstance(cls_name, str) or not cls_name.isidentifier():
        cls_name = "GraphModule"
    gm = fx.GraphModule(root, graph, class_name=cls_name)
    gm.training = root.training  # submodules keep their own flags
    return gm
