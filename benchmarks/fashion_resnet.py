"""ResRep vs Torch-Pruning on Fashion-MNIST with CIFAR-style ResNet-20 / ResNet-56.

Data: Debian's dataset-fashion-mnist (the four original IDX files), 28x28, 10 classes; the full
10,000-image test set; on CPU a fixed 10,000-image training subset (``--train-subset``), the full
60,000 on a GPU machine (``--train-subset 0``). Recipe: batch 64, SGD momentum 0.9, weight decay
1e-4 (not on norms/biases), cosine lr. Base: 6 epochs at lr 0.1 (1 epoch linear warm-up).
Pruning: ResRep trains 4 epochs at lr 0.05 from the base; the peer prunes one-shot and
fine-tunes 4 epochs at lr 0.05.

    python benchmarks/fashion_resnet.py [--models resnet20 resnet56] [--targets 0.5 0.3 0.1]
"""

from __future__ import annotations

import argparse

import torch
from common import add_method_arg, compare, machine, markdown, save, train_base
from torch.utils.data import DataLoader

from graphprune.apps.data import load_fashion_mnist
from graphprune.apps.models import cifar_resnet

DEPTHS = {"resnet20": 20, "resnet56": 56}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"], choices=list(DEPTHS))
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3, 0.1])
    p.add_argument("--train-subset", type=int, default=10_000)
    p.add_argument("--base-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=4)
    add_method_arg(p)
    args = p.parse_args()
    train_set, test_set = load_fashion_mnist(train_subset=args.train_subset or None)
    gen = torch.Generator().manual_seed(0)
    train = DataLoader(train_set, batch_size=64, shuffle=True, generator=gen)
    test = DataLoader(test_set, batch_size=500)
    example = (test_set[0][0][None],)
    results, tables = {}, []
    for name in args.models:
        torch.manual_seed(0)
        base = cifar_resnet(DEPTHS[name], num_classes=10, in_channels=1)
        base_acc, base_s = train_base(base, train, test, epochs=args.base_epochs, lr=0.1, seed=0)
        print(f"{name}: base {base_acc:.2f}% ({base_s:.0f} s)", flush=True)
        rows = compare(
            base, example, args.targets, train, test, method=args.method, epochs=args.epochs, seed=0
        )
        results[name] = {"base_acc": base_acc, "base_seconds": base_s, "rows": rows}
        tables.append(f"### {name}\n\n" + markdown(rows, base_acc))
    save(
        "benchmarks/results/fashion_resnet.json",
        {"machine": machine(), "args": vars(args), "results": results},
    )
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
