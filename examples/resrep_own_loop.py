"""ResRep inside a plain training loop: the hooks, not compress().

The same four calls work in a DDP or Lightning loop: build param groups from the hooks, call
``after_backward()`` between ``loss.backward()`` and ``optimizer.step()``, ``step()`` after
it, and ``finalize()`` at the end.

    python examples/resrep_own_loop.py [--epochs 8] [--flops-target 0.5]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import graphprune
from graphprune.apps.data import loaders_for
from graphprune.apps.models import resnet20
from graphprune.methods.resrep import ResRep
from graphprune.training.loop import evaluate


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--flops-target", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    train, test = loaders_for("digits", batch_size=32)
    model = resnet20(in_channels=1)  # your own model; here untrained, for brevity
    x = next(iter(test))[0][:1]

    gm = graphprune.trace(model, (x,))  # a copy: `model` is never modified
    total = args.epochs * len(train)
    rr = ResRep(gm, flops_target=args.flops_target, total_iters=total, lr=args.lr)
    opt = torch.optim.SGD(rr.param_groups(lr=args.lr), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)

    for _epoch in range(args.epochs):
        rr.model.train()
        for images, labels in train:
            loss = F.cross_entropy(rr.model(images), labels)
            opt.zero_grad()
            loss.backward()
            rr.after_backward()  # gradient resetting on the compactors
            opt.step()
            rr.step()  # mask schedule toward the MACs target
            sched.step()

    before = evaluate(rr.model, test)
    pruned = rr.finalize()  # fuse BN, fold compactors, remove zeroed channels
    after = evaluate(pruned, test)
    macs = graphprune.count_macs(pruned, (x,)).macs / graphprune.count_macs(model, (x,)).macs
    print(f"accuracy {before:.2f}% before folding, {after:.2f}% after; MACs kept {macs:.3f}")
    return {"before": before, "after": after, "macs_ratio": macs}


if __name__ == "__main__":
    main()
