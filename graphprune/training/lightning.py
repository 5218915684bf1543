"""A PyTorch Lightning callback that drives a method's hooks, so a Lightning training script
prunes with one line: ``Trainer(callbacks=[GraphpruneCallback(rr)])``.

Lightning calls ``on_after_backward`` after the gradients exist (and, under its DDP strategy,
after they are averaged across ranks) but before the optimizer steps, and
``on_train_batch_end`` after the step: exactly where the hooks protocol wants
``after_backward()`` and ``step()``. The method's state rides in Lightning's checkpoints
(``state_dict``/``load_state_dict``), and ``finalize()`` runs at the end of fit.

Your LightningModule must train ``rr.model`` and build its optimizer from
``rr.param_groups(lr)``. Gradient accumulation and fp16 loss scaling are refused: the hooks
would see partial or scaled gradients.
"""

from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError:  # the older standalone package
    try:
        from pytorch_lightning import Callback  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "graphprune.training.lightning needs PyTorch Lightning: pip install lightning"
        ) from exc

from graphprune.errors import TrainingError
from graphprune.training import distributed as D


class GraphpruneCallback(Callback):
    """Calls ``hooks.after_backward()`` / ``hooks.step()`` around each optimizer step and, with
    ``finalize=True``, ``hooks.finalize()`` when fit ends (the result is ``self.pruned``)."""

    def __init__(self, hooks: object, *, finalize: bool = True) -> None:
        super().__init__()
        for name in ("after_backward", "step", "state_dict", "load_state_dict"):
            if not callable(getattr(hooks, name, None)):
                raise TypeError(f"hooks must have {name}(); got a {type(hooks).__name__}")
        self.hooks, self.finalize = hooks, finalize
        self.pruned = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise TrainingError(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}: graphprune's hooks "
                "change each step's gradient and must see whole ones; use 1 and a larger batch"
            )
        if str(trainer.precision).startswith("16"):
            raise TrainingError(
                f"precision={trainer.precision!r}: fp16 loss scaling hands the hooks scaled "
                "gradients; use precision='bf16-mixed' or '32-true'"
            )

    def on_after_backward(self, trainer, pl_module) -> None:
        self.hooks.after_backward()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.hooks.step()

    def on_train_end(self, trainer, pl_module) -> None:
        D.sync_buffers(pl_module)  # every rank finalizes rank 0's masks
        if self.finalize and callable(getattr(self.hooks, "finalize", None)):
            self.pruned = self.hooks.finalize()

    def state_dict(self) -> dict:
        return self.hooks.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.hooks.load_state_dict(state_dict)
