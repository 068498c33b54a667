"""Task balancing in a Lightning ``training_step``, with Lightning's backward hooks, precision and strategies.

Needs Lightning (``pip install 'taskbalance[lightning]'``). Mix :class:`BalancedModule` into a LightningModule,
keep the balancer as a submodule, and call :meth:`~BalancedModule.balanced_backward` where manual optimisation
would call ``self.manual_backward(loss)``::

    import lightning.pytorch as pl
    import taskbalance as tb
    from taskbalance.lightning import BalancedModule

    class Net(BalancedModule, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.model = MultiLeNet()
            self.balancer = tb.make("igbv1+nashmtl", n_tasks=2)  # a submodule: its state is in the checkpoints

        def training_step(self, batch, batch_idx):
            x, y = batch
            optimizer = self.optimizers()
            optimizer.zero_grad()
            features, logits = self.model(x)
            losses = torch.stack([F.cross_entropy(out, y[:, k]) for k, out in enumerate(logits)])
            result = self.balanced_backward(self.balancer, losses, self.model.encoder.parameters(), features)
            optimizer.step()
            self.log_dict(result.as_dict(prefix="train/"))

        def on_train_epoch_end(self) -> None:
            self.balancer.end_epoch()

How: ``balanced_backward`` calls ``self.manual_backward(losses)``, so Lightning runs its whole backward path
(``strategy.backward`` → ``on_before_backward`` hooks → ``precision.backward`` → ``LightningModule.backward`` →
``on_after_backward`` hooks); :meth:`BalancedModule.backward` overrides that last public hook to run
``balancer.backward`` instead of ``loss.backward()``. The hooks see the K losses (scaled by the precision plugin's
GradScaler under ``precision="16-mixed"``, as Lightning scales any loss); the balancer gets the unscaled losses and
that scaler. ``strategy="ddp"`` needs nothing more: the balancer balances the global batch over the process group
itself (see :class:`~taskbalance.Balancer`'s ``distributed``) and DDP's hooks do not fire on its steps.

Automatic optimisation works through :meth:`~BalancedModule.balanced_loss` (``return`` it from ``training_step``)
without gradient accumulation; for ``accumulate_grad_batches`` > 1 and for FAMO's ``after_step``, which needs the
losses after the optimizer's step, use manual optimisation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from .balancer import Balancer
from .result import BalanceResult

INSTALL_HINT = "pip install 'taskbalance[lightning]'"

try:
    from lightning.pytorch import LightningModule
except ImportError as error:  # pragma: no cover - exercised only without lightning
    raise ImportError(f"taskbalance.lightning needs Lightning 2.6 or later: {INSTALL_HINT}") from error

__all__ = ["INSTALL_HINT", "BalancedModule"]


@dataclass
class _Request:
    """One balanced backward, handed from ``balanced_backward``/``balanced_loss`` to :meth:`BalancedModule.backward`
    across Lightning's strategy and precision plugin (which pass only the loss tensor along)."""

    balancer: Balancer
    losses: Tensor
    shared: list[Tensor]
    features: Tensor | None
    accumulate: bool
    result: BalanceResult | None = None
    done: bool = False


class BalancedModule:
    """Mixin for a ``lightning.pytorch.LightningModule``, listed first: ``class Net(BalancedModule, LightningModule)``.

    Attributes:
        balance_result: the last step's :class:`~taskbalance.BalanceResult` (None before the first, and after a
            recorded micro-batch): how automatic optimisation reads what the balancer did.
    """

    balance_result: BalanceResult | None = None
    _balance_request: _Request | None = None

    def balanced_backward(
        self,
        balancer: Balancer,
        losses: Tensor | Iterable[Tensor],
        shared_params: Iterable[Tensor],
        features: Tensor | None = None,
        *,
        accumulate: bool = False,
    ) -> BalanceResult | None:
        """``balancer.backward(losses, shared_params, features, accumulate=...)`` through ``self.manual_backward``.

        For manual optimisation (``self.automatic_optimization = False``); arguments as for
        :meth:`taskbalance.Balancer.backward`. Lightning's backward hooks fire around it, autocast is off inside it
        (the balancer's solvers run in float32, as outside ``training_step``), and the precision plugin's
        GradScaler, if any, is passed on. Returns the step's result (None for a recorded micro-batch).
        """
        module = self._lightning_module()
        if module.automatic_optimization:
            raise RuntimeError(
                "balanced_backward is for manual optimisation: set self.automatic_optimization = False, or return "
                "self.balanced_loss(...) from training_step under automatic optimisation"
            )
        request = self._balance_request_for(module, balancer, losses, shared_params, features, accumulate)
        self._balance_request = request
        try:
            module.manual_backward(request.losses)
        finally:
            self._balance_request = None
        if not request.done:
            raise RuntimeError(
                "Lightning's backward did not reach BalancedModule.backward: list BalancedModule before "
                "LightningModule among the bases, do not override backward below it, and use a strategy whose "
                "precision plugin calls LightningModule.backward (DeepSpeed's does not)"
            )
        return request.result

    def balanced_loss(
        self,
        balancer: Balancer,
        losses: Tensor | Iterable[Tensor],
        shared_params: Iterable[Tensor],
        features: Tensor | None = None,
    ) -> Tensor:
        """For automatic optimisation: return this from ``training_step``; Lightning's backward then balances.

        The returned tensor is Σ_k L_k, what Lightning logs as the step's ``loss``; its backward is replaced by
        ``balancer.backward`` (as in :meth:`balanced_backward`), whose result lands in :attr:`balance_result`.
        Refused with ``accumulate_grad_batches`` > 1: which micro-batch ends an optimizer step is Lightning's
        private state, and the balancer must know it (use manual optimisation and ``accumulate=True``).
        """
        module = self._lightning_module()
        if not module.automatic_optimization:
            raise RuntimeError("balanced_loss is for automatic optimisation; call balanced_backward in manual mode")
        if module.trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"accumulate_grad_batches={module.trainer.accumulate_grad_batches} is not supported under automatic "
                "optimisation: use manual optimisation with balanced_backward(..., accumulate=True) on every "
                "micro-batch but the last"
            )
        request = self._balance_request_for(module, balancer, losses, shared_params, features, False)
        self._balance_request = request
        return request.losses.sum()

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward hook: the pending balanced backward if there is one, else the ordinary one."""
        request = self._balance_request
        if request is None:
            cast(Any, super()).backward(loss, *args, **kwargs)
            return
        self._balance_request = None  # consumed: a stale request never runs twice
        if args or kwargs:
            raise TypeError("a balanced backward takes no backward arguments (retain_graph etc.)")
        module = self._lightning_module()
        scaler = getattr(module.trainer.precision_plugin, "scaler", None)
        with torch.autocast(request.losses.device.type, enabled=False):
            request.result = request.balancer.backward(
                request.losses, request.shared, request.features, scaler=scaler, accumulate=request.accumulate
            )
        request.done = True
        self.balance_result = request.result

    def _lightning_module(self) -> LightningModule:
        if not isinstance(self, LightningModule):
            raise TypeError(
                f"BalancedModule is a mixin for lightning.pytorch.LightningModule; {type(self).__name__} is not one"
            )
        return self

    def _balance_request_for(
        self,
        module: LightningModule,
        balancer: Balancer,
        losses: Tensor | Iterable[Tensor],
        shared_params: Iterable[Tensor],
        features: Tensor | None,
        accumulate: bool,
    ) -> _Request:
        """Check what only Lightning adds (the balancer's place) and stack the losses; the balancer checks the rest."""
        if not isinstance(balancer, Balancer):
            raise TypeError(f"balancer must be a taskbalance.Balancer, got {type(balancer).__name__}")
        if not any(child is balancer for child in module.modules()):
            raise ValueError(
                "the balancer is not a submodule of this LightningModule: assign it (self.balancer = tb.make(...)) "
                "so that its state is saved in checkpoints, restored on resume and moved to the module's device"
            )
        if not isinstance(losses, Tensor):
            items = list(losses)
            if not all(isinstance(x, Tensor) for x in items):
                raise TypeError("losses must be a tensor of shape (K,) or a sequence of K scalar tensors")
            losses = torch.stack([x.reshape(()) for x in items])
        shared = [shared_params] if isinstance(shared_params, Tensor) else list(shared_params)
        return _Request(balancer, losses, shared, features, accumulate)
