"""ResRep vs Torch-Pruning on scikit-learn digits with a CIFAR-style ResNet-56.

Recipe: digits upsampled to 16x16, fixed stratified split (1437 train / 360 test,
random_state=0), batch 32, SGD momentum 0.9, weight decay 1e-4 (not on norms/biases), cosine lr.
Base: 15 epochs at lr 0.1 (1 epoch linear warm-up). Pruning: ResRep trains 12 epochs at lr 0.05
from the base; the peer prunes the base one-shot and fine-tunes 12 epochs at lr 0.05.
round_to=1 for both.
``--subset 400`` is the harder variant (first 400 training images; 30 base / 24 pruning epochs,
so ResRep still gets >= 300 iterations), run with ``--seeds 0 1 2``.

    python benchmarks/digits_resnet56.py [--subset 400 --seeds 0 1 2] [--targets 0.5 0.3 ...]
"""

from __future__ import annotations

import argparse

import torch
from common import add_method_arg, compare, machine, markdown, mean_rows, save, train_base
from torch.utils.data import DataLoader, Subset

from graphprune.apps.data import load_digits_splits
from graphprune.apps.models import resnet56


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3, 0.1, 0.05, 0.02])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--subset", type=int, default=None, help="use the first N training images")
    p.add_argument("--out", default=None)
    add_method_arg(p)
    args = p.parse_args()
    train_set, test_set = load_digits_splits()
    if args.subset:
        train_set = Subset(train_set, range(args.subset))
    base_epochs, epochs = (30, 24) if args.subset else (15, 12)
    test = DataLoader(test_set, batch_size=256)
    example = (test_set[0][0][None],)
    rows, bases = [], []
    for seed in args.seeds:
        gen = torch.Generator().manual_seed(seed)
        train = DataLoader(train_set, batch_size=32, shuffle=True, generator=gen)
        torch.manual_seed(seed)
        base = resnet56(num_classes=10, in_channels=1)
        base_acc, base_s = train_base(base, train, test, epochs=base_epochs, lr=0.1, seed=seed)
        bases.append(base_acc)
        print(f"seed {seed}: base {base_acc:.2f}% ({base_s:.0f} s)", flush=True)
        rows += compare(
            base, example, args.targets, train, test, method=args.method, epochs=epochs, seed=seed
        )
    base_acc = sum(bases) / len(bases)
    table = markdown(mean_rows(rows), base_acc)
    name = f"digits_resnet56{'_subset' + str(args.subset) if args.subset else ''}"
    save(
        args.out or f"benchmarks/results/{name}.json",
        {"machine": machine(), "base_acc": bases, "rows": rows, "means": mean_rows(rows)},
    )
    print(table)


if __name__ == "__main__":
    main()
