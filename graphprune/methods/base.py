"""The Method interface: a validated config, prepare passes, training hooks, a plan, finalize
passes and typed stats, registered by name.

``compress()``, the CLI (``graphprune methods``, the ``compress`` flags), the demo and the
benchmarks only talk to this interface and to the registry, so a new method is one module:

    @register_method
    class KeepFirst(Method):
        '''Keep each group's first channels.'''
        name = "keep-first"
        config_class = KeepFirstConfig            # a MethodConfig subclass
        def scores(self):                          # higher = kept; the base plans and prunes
            return {g.id: -np.arange(g.channels, dtype=float) for g in self.prunable_groups}

Lifecycle (what ``compress`` does, and what a user's own loop does by hand):
``m = M(gm, config, total_iters=..., lr=...)`` runs the prepare passes on the traced ``gm``;
a method that ``needs_training`` (it ``trains``, or ``can_train`` and was given data) is then
trained through ``m.param_groups(lr)``, ``m.after_backward()``
(between backward and the optimizer step) and ``m.step()`` (after it), with
``m.state_dict()`` saved in checkpoints; ``m.finalize()`` runs the finalize passes and returns
the pruned GraphModule; ``m.stats()`` says what happened, as a frozen dataclass.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from types import NoneType, UnionType
from typing import Any, ClassVar, Literal

import numpy as np
from torch import fx

from graphprune.analysis import ChannelGraph, ChannelGroup, build_channel_graph
from graphprune.frontend.trace import example_inputs_of
from graphprune.passes import prune_channels
from graphprune.passes.runner import Pass, run_passes
from graphprune.planning.macs import count_macs
from graphprune.planning.plan import check_flops_target
from graphprune.planning.ranking import Rounding, select_kept
from graphprune.planning.selection import select_channels
from graphprune.training.loop import default_param_groups


def option(default: object, doc: str, *, cli: bool = True) -> Any:
    """A config field with a one-line ``doc`` (the CLI help and ``graphprune methods``).
    ``cli=False`` keeps an option that has no command-line form (a callable, an object) off
    the command line. Defaults must be immutable: configs are frozen values."""
    return field(default=default, metadata={"doc": doc, "cli": cli})


@dataclass(frozen=True, slots=True, kw_only=True)
class MethodConfig:
    """Options every method takes. Subclass it (frozen, slotted, kw_only) for a method's own
    options; each field is an ``option(default, doc)``. Values are checked against the type
    annotations on construction; override ``validate()`` for checks a type cannot express."""

    flops_target: float = option(0.5, "remaining MACs / dense MACs, in (0, 1); 0.5 keeps half")
    round_to: int = option(8, "round kept widths up to a multiple of this; 1 keeps the exact plan")

    def __post_init__(self) -> None:
        check_flops_target(self.flops_target)  # a PlanError, like every other target check
        hints = _hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise TypeError(
                    f"{type(self).__name__}: {f.name}={value!r} must be "
                    f"{describe_type(hints[f.name])}"
                )
        if self.round_to < 1:
            raise ValueError(
                f"round_to={self.round_to}: must be >= 1 (1 keeps the exact plan, 8 suits "
                "tensor cores and vectorized CPU kernels)"
            )
        self.validate()

    def validate(self) -> None:
        """Checks across fields or of ranges, in a subclass; raise ValueError naming the field."""

    @classmethod
    def options(cls) -> tuple[ConfigOption, ...]:
        """Every field with its type, default and one-line doc, in declaration order."""
        hints = _hints(cls)
        return tuple(ConfigOption.of(f, hints[f.name]) for f in fields(cls))

    def to_dict(self) -> dict[str, object]:
        """Field name -> value (nested dataclasses as dicts): for reports and checkpoints."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ConfigOption:
    """One config field as the CLI and ``graphprune methods`` show it."""

    name: str
    hint: Any  # the resolved annotation
    default: object
    doc: str
    cli: bool

    @staticmethod
    def of(f: Field, hint: Any) -> ConfigOption:
        if f.default is MISSING:
            raise TypeError(f"config field {f.name} needs a default: declare it with option()")
        return ConfigOption(
            f.name, hint, f.default, f.metadata.get("doc", ""), f.metadata.get("cli", True)
        )

    @property
    def type_name(self) -> str:
        return describe_type(self.hint, short=True)


class Method:
    """A pruning method on a traced GraphModule. Subclasses set ``name`` and ``config_class``
    and override the hooks they need; the defaults make a one-shot method that ranks channels
    by ``scores()``, plans globally to the MACs target and prunes.

    Invariants: ``model`` is the GraphModule being rewritten (it is the caller's ``gm``, changed
    in place by the prepare passes); ``graph`` and ``layer_macs`` describe ``model`` as it was
    traced (prepare passes add no channels, so group ids stay valid until finalize).
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    trains: ClassVar[bool] = False  # True: it must train (compress trains it through the hooks)
    can_train: ClassVar[bool] = False  # True: it trains when given training (e.g. fine-tuning)
    min_iters: ClassVar[int] = 0  # fewer training iterations are unlikely to reach the target

    def __init__(
        self,
        gm: fx.GraphModule,
        config: MethodConfig | None = None,
        *,
        total_iters: int | None = None,
        iters_per_epoch: int | None = None,
        lr: float | None = None,
        graph: ChannelGraph | None = None,
        layer_macs: Mapping[str, int] | None = None,
        verify: bool = False,
        **options: object,
    ) -> None:
        """``options`` are config fields (``flops_target=0.3``), an alternative to ``config``.
        ``total_iters``, ``iters_per_epoch`` and ``lr`` describe the training to come (methods
        that train size their schedules by them). ``graph``/``layer_macs`` may be passed when
        the caller already has them for ``gm``. ``verify`` checks the graph after each pass."""
        self.config = make_config(type(self), config, options)
        if self.needs_training(self.config, has_loader=False) and total_iters is None:
            raise TypeError(
                f"{self.name} trains: pass total_iters= (the optimizer steps you will run)"
            )
        self.total_iters, self.iters_per_epoch, self.lr = total_iters, iters_per_epoch, lr
        self.model = gm
        self.graph = graph if graph is not None else build_channel_graph(gm)
        if layer_macs is None:
            layer_macs = count_macs(gm, example_inputs_of(gm)).per_layer
        self.layer_macs = dict(layer_macs)
        self.verify = verify
        self.pass_stats: dict[str, object] = {}
        self.prepare()

    @classmethod
    def needs_training(cls, config: MethodConfig, *, has_loader: bool) -> bool:
        """Whether this method trains with ``config``: always when it ``trains`` (the config
        may also demand it, e.g. iterative magnitude); a method that ``can_train`` also trains
        when training data is given (``has_loader``), else it runs one-shot."""
        return cls.trains or (cls.can_train and has_loader)

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.graph.groups if g.prunable]

    # --- prepare --------------------------------------------------------------------------
    def prepare_passes(self) -> list[Pass]:
        """Passes that make the model trainable by this method (e.g. inserting compactors)."""
        return []

    def prepare(self) -> None:
        """Run the prepare passes on ``model``. Extend it to pick up what they inserted."""
        self._run(self.prepare_passes())

    # --- training hooks (a user's own loop calls these too) -------------------------------
    def param_groups(
        self, lr: float, *, weight_decay: float = 1e-4, momentum: float = 0.9
    ) -> list[dict]:
        """Optimizer groups: weight decay on conv/linear weights only, plus the method's own
        groups (``own_param_groups``), whose parameters the default groups leave out."""
        return default_param_groups(
            self.model, weight_decay, lr=lr, momentum=momentum, extra=self.own_param_groups(lr)
        )

    def own_param_groups(self, lr: float) -> list[dict]:
        """Groups of parameters with their own optimizer settings (e.g. compactors)."""
        return []

    def after_backward(self) -> None:
        """Called between ``loss.backward()`` and ``optimizer.step()`` (gradient edits)."""

    def step(self) -> None:
        """Called after ``optimizer.step()``, once per iteration (schedules, masks)."""

    def state_dict(self) -> dict:
        """What a resumed run needs beyond the model's and the optimizer's state."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``."""

    # --- plan and finalize ----------------------------------------------------------------
    def scores(self) -> dict[int, np.ndarray] | None:
        """Per prunable group id, one importance per channel (higher is kept), or None when
        the method does not rank channels (its finalize passes decide)."""
        return None

    def plan(self, scores: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Group id -> kept channels (the groups that shrink): the globally lowest scores go
        until the MACs target, then the selection lands within 0.01 under it
        (``select_kept``: widths multiples of ``round_to``, finer only where those cannot
        land). PlanError when even one channel per group stays above the target."""
        c = self.config
        select_channels(  # raises, naming the reachable minimum, when out of reach
            self.graph, scores, self.layer_macs, c.flops_target, round_to=c.round_to
        )
        sel = select_kept(
            self.graph,
            scores,
            self.layer_macs,
            c.flops_target,
            rounding=Rounding(c.round_to, c.round_to),
            floors={g: 1 for g in scores},
        )
        return {g: k for g, k in sel.kept.items() if len(k) < self.graph.groups[g].channels}

    def finalize_passes(self) -> list[Pass]:
        """Passes that turn the (trained) model into the pruned one."""
        scores = self.scores()
        if scores is None:
            raise NotImplementedError(
                f"{type(self).__name__}: define scores() or finalize_passes()"
            )
        plan = self.plan(scores)  # widths already rounded: the pruner rounds nothing
        return [functools.partial(prune_channels, plan=plan, scores=scores, round_to=1)]

    def finalize(self, *, verify: bool | None = None) -> fx.GraphModule:
        """Run the finalize passes in eval mode; mutates and returns ``model``."""
        self.model.eval()
        self.model = self._run(self.finalize_passes(), verify)
        return self.model

    @property
    def round_to(self) -> int:
        return self.config.round_to

    @property
    def widths(self) -> dict[int, int]:
        """Group id -> width after finalize, for the groups prune_channels narrowed."""
        stats = self.pass_stats.get("prune_channels") or {}
        return dict(stats.get("widths", {}))  # type: ignore[union-attr]

    def stats(self) -> object | None:
        """A frozen dataclass of what the method did (rendered generically by the report)."""
        return None

    # --- running passes -------------------------------------------------------------------
    def _run(self, passes: list[Pass], verify: bool | None = None) -> fx.GraphModule:
        if not passes:
            return self.model
        verify = self.verify if verify is None else verify
        result = run_passes(self.model, passes, verify=verify)
        self.pass_stats.update(result.stats)
        return result.gm


# --- configs --------------------------------------------------------------------------------
def make_config(
    method: type[Method], config: MethodConfig | None, options: Mapping[str, object]
) -> MethodConfig:
    """``config`` with ``options`` replaced, or ``method.config_class(**options)``; unknown
    options are a TypeError naming the valid ones."""
    cls = method.config_class
    if config is not None and type(config) is not cls:
        raise TypeError(f"{method.name} takes a {cls.__name__}, got {type(config).__name__}")
    valid = [o.name for o in cls.options()]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"{method.name} has no option {', '.join(unknown)}; its options: {', '.join(valid)}"
        )
    return replace(config, **options) if config is not None else cls(**options)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _matches(value: object, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint))
    if hint is NoneType:
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(origin, type):
        return isinstance(value, origin)
    return isinstance(value, hint) if isinstance(hint, type) else True


def describe_type(hint: Any, *, short: bool = False) -> str:
    """A type annotation in words: "a float", "one of 'adaptive', 'paper'", "None"."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, UnionType):
        parts = [describe_type(a, short=short) for a in typing.get_args(hint)]
        return ("|" if short else " or ").join(parts)
    if origin is Literal:
        values = [repr(a) for a in typing.get_args(hint)]
        return "|".join(values) if short else "one of " + ", ".join(values)
    if hint is NoneType:
        return "None"
    name = getattr(hint, "__name__", str(hint))
    return name if short else f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


# --- the registry ---------------------------------------------------------------------------
_REGISTRY: dict[str, type[Method]] = {}
M = typing.TypeVar("M", bound=type[Method])


def register_method(cls: M) -> M:
    """Class decorator: make ``cls`` available by ``cls.name`` to compress, the CLI, the demo.

    Checked here, so a broken plugin fails at import with the reason: a name, a config class
    of its own (a MethodConfig subclass), every config field with a default.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.strip():
        raise TypeError(f"{cls.__name__}.name must be a non-empty string, got {name!r}")
    config = getattr(cls, "config_class", None)
    if (
        not (isinstance(config, type) and issubclass(config, MethodConfig))
        or config is MethodConfig
    ):
        raise TypeError(
            f"{cls.__name__}.config_class must be a MethodConfig subclass of its own, "
            f"got {config!r}"
        )
    config.options()  # every field has a default and resolvable annotations
    other = _REGISTRY.get(name)
    if other is not None and (other.__module__, other.__qualname__) != (
        cls.__module__,
        cls.__qualname__,
    ):
        raise ValueError(
            f"method name {name!r} is taken by {other.__module__}.{other.__qualname__}; "
            "choose another name"
        )
    for known in _REGISTRY.values():
        if known.config_class is config and known.name != name:
            raise ValueError(
                f"{cls.__name__} shares config class {config.__name__} with {known.name}"
            )
    _REGISTRY[name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove a method (tests and plugins that register temporary ones)."""
    _REGISTRY.pop(name, None)


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def get_method(name_or_config: str | MethodConfig) -> type[Method]:
    """The registered method called ``name``, or the one whose config class made ``config``."""
    _load_builtin_methods()
    if isinstance(name_or_config, MethodConfig):
        for cls in _REGISTRY.values():
            if cls.config_class is type(name_or_config):
                return cls
        raise ValueError(
            f"no registered method takes a {type(name_or_config).__name__}; "
            f"known methods: {', '.join(sorted(_REGISTRY))}"
        )
    if not isinstance(name_or_config, str):
        raise TypeError(
            f"method must be a name or a MethodConfig, got {type(name_or_config).__name__}"
        )
    cls = _REGISTRY.get(name_or_config)
    if cls is None:
        raise ValueError(
            f"unknown method {name_or_config!r}; known methods: {', '.join(sorted(_REGISTRY))} "
            "(register your own with @register_method; the CLI imports it with --plugin)"
        )
    return cls


def _load_builtin_methods() -> None:
    import graphprune.methods  # noqa: F401  (registers the built-in methods)
