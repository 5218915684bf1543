"""Training checkpoints: what a resumed run needs to continue exactly as if never stopped, and
the configuration it was started with, so a resume cannot silently continue a different run.

A checkpoint is one file, ``last.pt`` in the checkpoint folder, written atomically (temporary
file, fsync, rename, fsync of the folder) and read with ``weights_only=True`` (no code runs):

    format, version        "graphprune.checkpoint", 2
    config                 JSON text: {"fit": the loop's own settings, "run": the caller's
                           run_config (method, flops_target, round_to, ...)}
    epoch, batch           position: ``batch`` batches of epoch ``epoch`` (0-based) are done
    running, seen          the epoch's running loss sum and batch count (for its history row)
    model, optimizer       state_dicts; ``hooks``: the method's state_dict
    history                finished epochs' rows
    rng                    per rank: the RNG states now, and at the start of the epoch (a
                           mid-epoch resume rebuilds the epoch's data order from those, skips
                           the batches already seen, then restores the states of "now")

RNG states cover Python's ``random``, NumPy's global generator, torch CPU, CUDA (when
initialized) and the DataLoader's own ``generator`` if it has one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from graphprune.errors import ModelFileError, TrainingError
from graphprune.io import atomic_save, safe_load

CHECKPOINT = "last.pt"
FORMAT, VERSION = "graphprune.checkpoint", 2


# --- RNG -----------------------------------------------------------------------------------------
def capture_rng(loader: object = None) -> dict:
    """Every RNG a training step or a data loader may draw from, as plain Python values (safe
    for weights_only loading and for torch.distributed object collectives)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    gen = getattr(loader, "generator", None)
    return {
        "python": random.getstate(),
        "numpy": [str(kind), keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": None if cuda is None else [s.tolist() for s in cuda],
        "loader": gen.get_state().tolist() if isinstance(gen, torch.Generator) else None,
    }


def _bytes(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def restore_rng(state: Mapping, loader: object = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes(state["torch"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes(s) for s in state["cuda"]])
    gen = getattr(loader, "generator", None)
    if state.get("loader") is not None:
        if not isinstance(gen, torch.Generator):
            raise TrainingError(
                "the checkpoint holds a DataLoader generator state but this train_loader has "
                "no generator: pass the same DataLoader(generator=...) as the run you resume"
            )
        gen.set_state(_bytes(state["loader"]))


# --- configuration -------------------------------------------------------------------------------
def normalize_config(config: Mapping[str, object] | None, *, what: str) -> dict:
    """``config`` as JSON would give it back (tuples become lists), or a clear error naming the
    key that is not JSON-safe."""
    config = dict(config or {})
    for key, value in config.items():
        try:
            json.dumps(value, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{what}[{key!r}] = {value!r} is not JSON-safe ({exc}); pass numbers, strings, "
                "lists or dicts (e.g. str() of an object) so a resume can compare it"
            ) from exc
    return json.loads(json.dumps(config))


def config_differences(saved: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every key that differs, recursing into dicts."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, dict) and isinstance(new, dict):
            out += config_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return out


def check_resume_config(path: Path, saved: Mapping, current: Mapping, *, force: bool) -> None:
    diffs = config_differences(saved, current)
    if diffs and not force:
        raise TrainingError(
            f"cannot resume from {path}: it was written by a run with another configuration "
            f"({'; '.join(diffs)}). Use another checkpoint_dir for the new run, delete the "
            "checkpoint, or pass resume='force' to continue it with the new settings anyway"
        )
    if diffs:
        import warnings

        warnings.warn(f"resume='force': continuing {path} despite {'; '.join(diffs)}", stacklevel=3)


# --- files ---------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: Mapping[str, object]) -> Path:
    return atomic_save({"format": FORMAT, "version": VERSION, **state}, path)


def load_checkpoint(path: Path) -> dict:
    """The checkpoint's contents, read without running code; TrainingError naming the file if
    it is damaged, refused, or from an older graphprune."""
    try:
        state = safe_load(path, what="checkpoint")
    except (ModelFileError, OSError) as exc:
        raise TrainingError(f"cannot resume from {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError(
            f"cannot resume from {path}: not a graphprune checkpoint, or one written by an "
            "older graphprune (without the run configuration a resume must check); delete it "
            "or use another checkpoint_dir"
        )
    if state.get("version") != VERSION:
        raise TrainingError(f"cannot resume from {path}: checkpoint version {state['version']}")
    return state
