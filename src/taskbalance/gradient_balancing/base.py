"""The gradient level: a method that combines the K per-task gradients of the shared parameters into one update.

Notation: J is the K × P matrix whose rows are g_k = ∇_θ ℓ̃_k over the shared parameters θ, and G = J Jᵀ its
Gramian. A method declares which of the two it reads, if any (:attr:`GradientBalancer.needs`):

- ``"gramian"``: the method computes weights w from G alone and the update is Jᵀ w = Σ_k w_k g_k. The engine
  may then obtain G without ever materialising J, or apply w with one ordinary backward of Σ_k w_k ℓ̃_k.
- ``"jacobian"``: the method needs J itself (per-coordinate operations, or state made of past gradients).
- ``"nothing"``: no balancing (:class:`~taskbalance.gradient_balancing.sum.Sum`): the engine runs one ordinary
  backward of Σ_k ℓ̃_k and never forms J or G.

The "sum convention": with K equal gradients g, the update is K·g = ∇ Σ_k ℓ̃_k. Methods whose natural output
is a convex combination multiply by K, as the reference implementations do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..method import Method


@dataclass(frozen=True)
class Combination:
    """What a gradient method returns for one step.

    A weight-based method sets ``weights`` and the engine applies Jᵀw. A method whose update is not Jᵀw for the
    current J sets ``direction``, which is then the update; any ``weights`` it also sets are for reporting only
    (e.g. MoCo's weights on its tracked gradients).

    Attributes:
        weights: w of shape (K,) with update = Jᵀ w (weight-based methods), detached.
        direction: the update of the shared parameters, flat of shape (P,), for methods whose update is not
            Jᵀ w for the current J (e.g. DB-MTL's EMA gradients, GradDrop's per-coordinate masks).
        converged: False when an inner solver did not converge; the method documents what it returned then.
        note: a short human-readable reason when ``converged`` is False.
    """

    weights: Tensor | None = None
    direction: Tensor | None = None
    converged: bool = True
    note: str = ""

    def __post_init__(self) -> None:
        if self.weights is None and self.direction is None:
            raise ValueError("a Combination needs weights or a direction")


class GradientBalancer(Method):
    """Base class of every gradient-balancing method.

    Subclasses set :attr:`needs`, implement :meth:`combine`, and declare their ``options`` and ``state`` (see
    :mod:`taskbalance.method`), from which ``state_dict()``, repr and the load checks follow. ``max_norm``
    (None = no clipping) bounds the norm of the shared update, as the Nash-MTL reference code does.
    """

    needs: ClassVar[Literal["gramian", "jacobian", "nothing"]] = "jacobian"
    options: ClassVar[tuple[str, ...]] = ("max_norm",)

    def __init__(self, max_norm: float | None = None) -> None:
        super().__init__()
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be positive or None, got {max_norm}")
        self.max_norm = max_norm

    def forward(self, matrix: Tensor, losses: Tensor) -> Combination:
        """Combine: ``matrix`` is G (K × K) or J (K × P) as :attr:`needs` says; ``losses`` are ℓ̃, detached.

        ``matrix`` is the engine's buffer, valid during the call only (the next step overwrites it): a method
        keeps what it derives from it (an EMA, a copy), never the tensor itself.
        """
        self._require_setup()
        if self.needs == "jacobian":
            return self.combine(matrix, losses)
        # From G the method solves a K × K problem: a few hundred operations on tensors of K or K² entries, where
        # torch's per-operation dispatch is most of the cost. Inference mode skips the autograd and version-counter
        # bookkeeping (same kernels, same values to the bit; ~20% of the solve). The weights leave as an ordinary
        # tensor, which the engine may save for a backward of Σ_k w_k ℓ̃_k; state the method keeps stays inside its
        # own calls (state_dict() copies it out as ordinary tensors).
        with torch.inference_mode():
            combination = self.combine(matrix, losses)
        weights = combination.weights
        return combination if weights is None else replace(combination, weights=weights.clone())

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:  # pragma: no cover - abstract
        """The method itself (what a subclass writes). A method reading G is called under
        ``torch.inference_mode()``: the tensors it creates, its kept state included, are inference tensors, which
        its own later calls may update in place but code outside them may only replace (assign), not modify."""
        raise NotImplementedError
