"""The Backend interface and its registry: how an artifact is written, run and timed.

A backend is one class with a ``name`` (what ``--backend`` accepts), the ``suffix`` of the
artifacts it writes, ``available()`` (and ``unavailable_reason()`` saying why not and what to
install), ``export()`` and ``runner()``. It registers itself with :func:`register_backend` when
its module is imported, so the CLI, ``graphprune bench``, the demo and the benchmarks read the
registry and never name a backend themselves.

Invariants: a backend's module imports its optional dependency (tensorrt) inside functions only,
so registering it costs nothing and ``import graphprune`` never needs it; an unusable backend
raises :class:`BackendUnavailableError` naming what to install, never an ImportError.

A runner is anything with the :class:`Runner` attributes: it runs inputs, makes a bound forward
pass for a batch size (``step``) and says how to time it (``clock``), so one timing routine
(:mod:`.timing`) serves every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from graphprune.errors import BackendUnavailableError

__all__ = [
    "Backend",
    "Clock",
    "Runner",
    "backend_for_path",
    "backend_names",
    "get_backend",
    "register_backend",
]


class Clock(Protocol):
    """Times one call of a bound forward pass, in milliseconds, on the clock that matters.

    Host timers measure kernel launches on a GPU, not the kernels, so GPU runners bring a clock
    that records device events around the call.
    """

    def __call__(self, step: Callable[[], object]) -> float: ...


@runtime_checkable
class Runner(Protocol):
    """A loaded artifact (or model) that runs inputs and can be timed.

    ``backend`` names the runtime in reports ("onnxruntime", "tensorrt", "torch"), ``device``
    the hardware, ``threads`` the intra-op thread count (None where it does not apply, e.g. a
    GPU). ``step(batch_size)`` binds random inputs of that batch once and returns a call that
    runs one forward pass on them; ``clock`` times such a call.
    """

    backend: str
    device: str
    threads: int | None
    clock: Clock

    def run(self, *inputs: Any) -> list[Any]: ...

    def step(self, batch_size: int) -> Callable[[], object]: ...


class Backend:
    """Base class of a backend; subclass it, set the class attributes, register it.

    ``export(model, example_inputs, path, fp16=..., batch_sizes=..., **options)`` writes the
    artifact at ``path`` (the caller's model is never mutated) and returns the path;
    ``batch_sizes`` are the batches it will be run at, for backends that specialize on them
    (TensorRT tunes one profile per batch) and ignored by the others.
    ``runner(artifact, threads=None, **options)`` loads it. ``threads`` is the CPU intra-op
    thread count where the runtime has one (None: its default); GPU runtimes accept and ignore
    it, and say ``threads=None`` in their records. ``install`` is the line an unavailable
    backend's error gives as the fix.
    """

    name: ClassVar[str]
    suffix: ClassVar[str]
    description: ClassVar[str] = ""
    install: ClassVar[str] = ""

    def unavailable_reason(self) -> str | None:
        """None when usable here, else why not (missing package, no GPU)."""
        return None

    def available(self) -> bool:
        """True when export() and runner() can work on this machine."""
        return self.unavailable_reason() is None

    def require(self) -> None:
        """Raise BackendUnavailableError with the reason and what to install when unusable."""
        reason = self.unavailable_reason()
        if reason is not None:
            fix = f"; {self.install}" if self.install else ""
            raise BackendUnavailableError(f"the {self.name} backend is unavailable: {reason}{fix}")

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
        raise NotImplementedError(f"the {self.name} backend cannot export")

    def runner(
        self, artifact: str | Path | nn.Module, *, threads: int | None = None, **options: Any
    ) -> Runner:
        raise NotImplementedError(f"the {self.name} backend has no runner")

    def artifact_path(self, artifact: str | Path | nn.Module) -> Path:
        """``artifact`` as an existing file path; a clear error for a module or a missing file."""
        if isinstance(artifact, nn.Module):
            raise TypeError(
                f"the {self.name} backend runs {self.suffix} files, not modules: write one with "
                f"get_backend({self.name!r}).export(model, example_inputs, path) first"
            )
        path = Path(artifact)
        if not path.is_file():
            raise FileNotFoundError(f"no {self.name} artifact at {path}; export one first")
        return path

    def __repr__(self) -> str:
        return f"<backend {self.name} ({self.suffix})>"


_REGISTRY: dict[str, Backend] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make ``cls`` available under ``cls.name``.

    Registering a second backend under a taken name, or for a taken suffix, is an error:
    silently replacing one would change what ``--backend`` or a file suffix means.
    """
    for attr in ("name", "suffix"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise TypeError(f"backend class {cls.__name__} needs a non-empty str `{attr}`")
    if not cls.suffix.startswith("."):
        raise ValueError(f"backend {cls.name}: suffix must start with '.', got {cls.suffix!r}")
    if cls.name in _REGISTRY:
        raise ValueError(f"a backend named {cls.name!r} is already registered")
    clash = next((b for b in _REGISTRY.values() if b.suffix == cls.suffix), None)
    if clash is not None:
        raise ValueError(
            f"backend {cls.name}: suffix {cls.suffix} already belongs to backend {clash.name}"
        )
    _REGISTRY[cls.name] = cls()
    return cls


def unregister_backend(name: str) -> None:
    """Remove a backend (for tests that register a toy one)."""
    _REGISTRY.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """Registered backend names, in registration order (the CLI's choices)."""
    return tuple(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; ValueError listing the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known backends: {_known()}") from None


def backend_for_path(path: str | Path) -> Backend:
    """The backend whose artifacts end like ``path``; ValueError naming the known suffixes."""
    suffix = Path(path).suffix
    for backend in _REGISTRY.values():
        if backend.suffix == suffix:
            return backend
    known = ", ".join(f"{b.suffix} ({b.name})" for b in _REGISTRY.values())
    what = suffix or "files without a suffix"
    raise ValueError(f"no backend reads {what} ({path}); known: {known}")


def _known() -> str:
    return ", ".join(
        name + ("" if b.available() else f" (unavailable here: {b.install or 'see its docs'})")
        for name, b in _REGISTRY.items()
    )
