"""taskbalance.lightning: Lightning's hooks fire around the balanced backward, checkpoints resume the balancer
exactly, automatic optimisation and bf16-mixed work, and ``strategy="ddp"`` keeps two CPU ranks identical."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

pytest.importorskip("lightning", reason="Lightning is not installed (pip install 'taskbalance[lightning]')")

import lightning.pytorch as pl

import taskbalance as tb
from taskbalance.lightning import BalancedModule
from tests.distributed.workers import flat_state
from tests.models import TinyMTL, make_data

N_TASKS = 3
N_SAMPLES = 64
ROOT = Path(__file__).resolve().parents[1]

# Lightning 2.6 under torch 2.13 and a CPU-only machine: noise, not findings
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
]


class Net(BalancedModule, pl.LightningModule):
    """TinyMTL with a balancer, trained by SGD; records every step's weights and parameters and the hook calls."""

    def __init__(self, spec: str = "igbv1+nashmtl", automatic: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.automatic_optimization = automatic
        self.model = TinyMTL(n_tasks=N_TASKS, seed=0)
        torch.manual_seed(seed)  # methods seeded from the global RNG start apart for different seeds
        self.balancer = tb.make(spec, n_tasks=N_TASKS)
        self.steps: list[dict[str, Tensor]] = []
        self.hooks: list[tuple[str, bool]] = []  # (hook, whether the encoder had a gradient then)

    def task_losses(self, batch: list[Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        features, outputs = self.model(x)
        losses = torch.stack([(k + 1.0) * (out - y[:, k]).pow(2).mean() + 0.1 for k, out in enumerate(outputs)])
        return features, losses

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor | None:
        features, losses = self.task_losses(batch)
        shared = self.model.encoder.parameters()
        if self.automatic_optimization:
            return self.balanced_loss(self.balancer, losses, shared, features)
        optimizer = self.optimizers()
        assert isinstance(optimizer, pl.core.optimizer.LightningOptimizer)
        optimizer.zero_grad()
        self.balanced_backward(self.balancer, losses, shared, features)
        optimizer.step()
        return None

    def on_train_batch_end(self, outputs: Any, batch: list[Tensor], batch_idx: int) -> None:
        with torch.no_grad():
            self.balancer.after_step(self.task_losses(batch)[1])
        assert self.balance_result is not None
        self.steps.append({"weights": self.balance_result.weights.clone(), "params": _flat(self.model)})

    def on_train_epoch_end(self) -> None:
        self.balancer.end_epoch()

    def on_before_backward(self, loss: Tensor) -> None:
        self.hooks.append(("before", self.model.encoder[0].weight.grad is not None))

    def on_after_backward(self) -> None:
        self.hooks.append(("after", self.model.encoder[0].weight.grad is not None))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class CountHooks(pl.Callback):
    """Counts the callbacks' side of the backward hooks."""

    def __init__(self) -> None:
        self.before = 0
        self.after = 0

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.before += 1

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.after += 1


def _flat(model: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def loader(batch_size: int = 8, rank: int | None = None) -> DataLoader[tuple[Tensor, ...]]:
    """The data in order; with ``rank``, that rank's interleaved half (samples rank, rank + 2, ...)."""
    x, y = make_data(n_tasks=N_TASKS, n=N_SAMPLES)
    data = TensorDataset(x, y)
    if rank is None:
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, 2, rank, shuffle=False))


def trainer(max_epochs: int, **options: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **options,
    }
    return pl.Trainer(**settings)


def plain_loop(spec: str, epochs: int) -> Tensor:
    """The same training without Lightning: ``balancer.backward`` in a hand-written loop; the final parameters."""
    net = Net(spec)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(epochs):
        for batch in loader():
            optimizer.zero_grad()
            features, losses = net.task_losses(list(batch))
            net.balancer.backward(losses, net.model.encoder.parameters(), features)
            optimizer.step()
            with torch.no_grad():
                net.balancer.after_step(net.task_losses(list(batch))[1])
        net.balancer.end_epoch()
    return _flat(net.model)


def test_backward_hooks_fire_on_every_step_and_the_update_is_the_balancers() -> None:
    net, counter = Net(), CountHooks()
    trainer(2, callbacks=[counter]).fit(net, loader())
    steps = 2 * N_SAMPLES // 8
    assert len(net.steps) == steps == 16
    assert (counter.before, counter.after) == (steps, steps)
    # the module's hooks, in order: no gradient before the balanced backward, the balanced one after it
    assert net.hooks == [("before", False), ("after", True)] * steps
    assert torch.equal(net.steps[-1]["params"], plain_loop("igbv1+nashmtl", epochs=2))


def test_automatic_optimisation_matches_manual() -> None:
    manual, automatic = Net(automatic=False), Net(automatic=True)
    trainer(1).fit(manual, loader())
    trainer(1).fit(automatic, loader())
    assert len(automatic.steps) == len(manual.steps) == 8
    assert len(automatic.hooks) == 16
    for a, m in zip(automatic.steps, manual.steps, strict=True):
        assert torch.equal(a["weights"], m["weights"])
        assert torch.equal(a["params"], m["params"])


def test_automatic_optimisation_refuses_gradient_accumulation() -> None:
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 is not supported"):
        trainer(1, accumulate_grad_batches=2).fit(Net(automatic=True), loader())


def test_mode_mismatch_and_a_balancer_outside_the_module_are_refused() -> None:
    class Misplaced(Net):
        def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor | None:
            features, losses = self.task_losses(batch)
            outside = tb.make("ew", n_tasks=N_TASKS)
            self.balanced_backward(outside, losses, self.model.encoder.parameters(), features)
            return None

    with pytest.raises(ValueError, match="not a submodule"):
        trainer(1).fit(Misplaced(), loader())

    class ManualCallInAutomatic(Net):
        def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor | None:
            features, losses = self.task_losses(batch)
            self.balanced_backward(self.balancer, losses, self.model.encoder.parameters(), features)
            return None

    with pytest.raises(RuntimeError, match="for manual optimisation"):
        trainer(1).fit(ManualCallInAutomatic(automatic=True), loader())


@pytest.mark.parametrize("spec", ["igbv2+cagrad", "famo"])
def test_checkpoint_resumes_the_balancer_to_an_identical_next_step(spec: str, tmp_path: Path) -> None:
    uninterrupted = Net(spec)
    trainer(2).fit(uninterrupted, loader())

    first = Net(spec)
    first_trainer = trainer(1)
    first_trainer.fit(first, loader())
    path = tmp_path / "epoch1.ckpt"
    first_trainer.save_checkpoint(path)
    assert any(key.startswith("balancer.") for key in torch.load(path, weights_only=False)["state_dict"])

    resumed = Net(spec, seed=123)  # another balancer state and RNG until the checkpoint is loaded
    trainer(2).fit(resumed, loader(), ckpt_path=path)
    assert len(resumed.steps) == 8
    for got, want in zip(resumed.steps, uninterrupted.steps[8:], strict=True):
        assert torch.equal(got["weights"], want["weights"])  # max abs diff 0.0: bit-identical
        assert torch.equal(got["params"], want["params"])
    assert (
        flat_state(resumed.balancer.state_dict(), "").keys()
        == flat_state(uninterrupted.balancer.state_dict(), "").keys()
    )
    for key, value in flat_state(resumed.balancer.state_dict(), "").items():
        assert torch.equal(value, flat_state(uninterrupted.balancer.state_dict(), "")[key]), key


def test_bf16_mixed_precision_on_cpu() -> None:
    """Manual backward runs inside autocast; the balancer runs outside it, so its float32 update fits the
    float32 parameters (with autocast on, the features path computes the update in bfloat16 and writing it fails)."""
    net = Net("nashmtl")
    before = _flat(net.model)
    trainer(1, precision="bf16-mixed").fit(net, loader())
    assert len(net.steps) == 8
    assert net.balance_result is not None
    assert net.balance_result.weights.dtype == torch.float32
    assert bool(torch.isfinite(net.steps[-1]["params"]).all())
    assert not torch.equal(net.steps[-1]["params"], before)


def test_fp16_gradscaler_of_the_precision_plugin_is_passed_to_the_balancer() -> None:
    """Under "16-mixed" the plugin's GradScaler unscales ``.grad`` before the step: the balancer must have written
    the scaled update. With the scale at 1024 (no overflow, no skipped step) training matches a disabled scaler."""
    from lightning.pytorch.plugins import MixedPrecision

    def run(enabled: bool) -> Net:
        net = Net("nashmtl")
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=enabled)
        trainer(1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(net, loader())
        return net

    scaled, unscaled = run(True), run(False)
    assert not any(bool(torch.isnan(step["weights"]).any()) for step in scaled.steps)  # no step skipped
    moved = (unscaled.steps[-1]["params"] - _flat(Net().model)).abs().max()
    assert moved > 0.1
    torch.testing.assert_close(scaled.steps[-1]["params"], unscaled.steps[-1]["params"], atol=1e-5, rtol=0)


# -- strategy="ddp" on two CPU processes ----------------------------------------------------------------------------
DDP_SPEC = "igbv1+nashmtl"


def ddp_main(out: str) -> None:
    """Body of ``strategy="ddp"`` with 2 CPU processes (Lightning relaunches the script for rank 1): each rank saves
    its parameters, weights and balancer state. Each rank's balancer starts from another seed: rank 0's is taken."""
    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by Lightning in the process it launches
    net = Net(DDP_SPEC, seed=1000 + rank)
    # Lightning's own sampler would shuffle the training data whatever the DataLoader says: ours keeps the order
    run = trainer(2, devices=2, strategy="ddp", use_distributed_sampler=False)
    run.fit(net, loader(batch_size=8, rank=rank))
    saved = {
        "params": net.steps[-1]["params"],
        "weights": torch.stack([s["weights"] for s in net.steps]),
        "balancer": flat_state(net.balancer.state_dict(), ""),
    }
    torch.save(saved, Path(out) / f"rank{run.global_rank}.pt")


@pytest.mark.slow  # 13-22 s measured on two busy cores: two processes import torch and Lightning
def test_ddp_two_cpu_processes_keep_ranks_identical(tmp_path: Path) -> None:
    script = tmp_path / "ddp_run.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from tests.test_lightning import ddp_main
            if __name__ == "__main__":
                ddp_main(sys.argv[1])
            """
        )
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["weights"].shape == (2 * N_SAMPLES // 16, N_TASKS)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    assert ranks[0]["balancer"].keys() == ranks[1]["balancer"].keys()
    for key, value in ranks[0]["balancer"].items():
        assert torch.equal(value, ranks[1]["balancer"][key]), key
    # the two shards of 8 are the global batch of 16: one process on it agrees
    single = Net(DDP_SPEC)
    trainer(2).fit(single, loader(batch_size=16))
    torch.testing.assert_close(ranks[0]["weights"], torch.stack([s["weights"] for s in single.steps]))
    torch.testing.assert_close(ranks[0]["params"], single.steps[-1]["params"])
