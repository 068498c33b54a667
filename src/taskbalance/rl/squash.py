"""Squashing maps: how SAC turns the Gaussian sample u into an action a, and the log-density of that action.

SAC's entropy bonus and its temperature tuning need log π(a|s), the density of the action the critics see.
When a = f(u) with u ~ N(μ, diag σ²), that density is the Gaussian density of u corrected by the map f; the
correction depends on f, so each map computes its own :meth:`Squash.log_prob`.

- :class:`TanhSquash` (control tasks): a = c + h·tanh(u), the usual bounded box of continuous control.
- :class:`SoftmaxSquash` (IGBv2): a = s·softmax(u), task weights in (0, s) summing to s.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(u: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Σ_k log N(u_k; μ_k, σ_k²) over the last dimension."""
    z = (u - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * _LOG_2PI).sum(-1)


def log_tanh_derivative(u: Tensor) -> Tensor:
    """log(1 − tanh²u) written as 2(log 2 − u − softplus(−2u)), exact and finite for large |u|."""
    return 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))


class Squash(nn.Module, ABC):
    """A map u ↦ a (:meth:`forward`) with the log-density of a (:meth:`log_prob`)."""

    @abstractmethod
    def forward(self, u: Tensor) -> Tensor:
        """The action a = f(u), elementwise over leading dimensions."""

    @abstractmethod
    def log_prob(self, u: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
        """log π(a) for a = f(u), u ~ N(mean, diag exp(log_std)²); shape = u's without the last dimension."""

    def sample(self, mean: Tensor, log_std: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """(a, log π(a)) for the reparameterised u = mean + exp(log_std)·noise (SAC's every draw).

        A map may override this to compute the density from the noise directly (fewer tensor operations in the
        update, where it runs twice per step and is differentiated once): same value as
        ``(self(u), self.log_prob(u, mean, log_std))`` up to rounding.
        """
        u = mean + log_std.exp() * noise
        return self(u), self.log_prob(u, mean, log_std)


class TanhSquash(Squash):
    """a = c + h·tanh(u) into the box [low, high], c = (high + low)/2, h = (high − low)/2.

    log π(a) = Σ_k [log N(u_k; μ_k, σ_k) − log(1 − tanh²u_k) − log h_k]: the change of variables of the
    elementwise bijection. The constant Σ log h is kept (several SAC codes drop it) so that the entropy the
    temperature is tuned on is the entropy of the action actually taken.
    """

    center: Tensor
    half_range: Tensor

    def __init__(self, low: float | Sequence[float], high: float | Sequence[float]) -> None:
        super().__init__()
        lo = torch.as_tensor(low, dtype=torch.float64).reshape(-1)
        hi = torch.as_tensor(high, dtype=torch.float64).reshape(-1)
        if lo.shape != hi.shape and lo.numel() != 1 and hi.numel() != 1:
            raise ValueError(f"low and high must have the same length, got {lo.numel()} and {hi.numel()}")
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()) or not bool((hi > lo).all()):
            raise ValueError(f"need finite bounds with low < high, got low={low}, high={high}")
        self.register_buffer("center", ((hi + lo) / 2).to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("half_range", ((hi - lo) / 2).to(torch.get_default_dtype()), persistent=False)

    def forward(self, u: Tensor) -> Tensor:
        return self.center + self.half_range * torch.tanh(u)

    def log_prob(self, u: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
        correction = log_tanh_derivative(u) + torch.log(self.half_range).to(u.dtype)
        return gaussian_log_prob(u, mean, log_std) - correction.sum(-1)

    def extra_repr(self) -> str:
        return f"low={(self.center - self.half_range).tolist()}, high={(self.center + self.half_range).tolist()}"


class SoftmaxSquash(Squash):
    """a = s·softmax(u): K positive weights summing to s (IGBv2: s = K).

    softmax is not a bijection of ℝ^K (u and u + c·1 give the same a), so a has no density in ℝ^K; it has
    one on the simplex Δ_s = {a > 0, Σ a = s}, a (K−1)-dimensional surface. ``density`` picks:

    - ``"simplex"`` (default, correct): density w.r.t. the surface measure of Δ_s. With v = u − ū·1 and
      d = u − μ, integrating N(u; μ, σ) along the direction 1 gives the density of v on 1⊥:
          log p(v) = −½ Σ_k ((d_k − d̄)/σ_k)² − (K−1)/2·log 2π − Σ_k log σ_k + ½ log K − ½ log Σ_k σ_k⁻²,
      d̄ = Σ_k σ_k⁻² d_k / Σ_k σ_k⁻²; the map v ↦ a (inverse: centred log-ratio) has Jacobian determinant
      K/(s·Π a_k) on the tangent space, so log π(a) = log p(v) + log(s/K) − Σ_k log a_k.
      The −Σ log a_k term penalises weights pressed against the simplex faces, the role the tanh correction
      plays for a box; without it the entropy bonus would reward ever wider u that saturate the softmax.
    - ``"reference"``: the IGB4MTL code's formula, Σ_k [log N(u_k; μ_k, σ_k) − log(1 − tanh²u_k)]: the
      tanh correction of the original SAC kept although the action is made by a softmax. It is not a density
      of a; keep it only to reproduce the reference runs.
    """

    def __init__(self, scale: float, density: Literal["simplex", "reference"] = "simplex") -> None:
        super().__init__()
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        if density not in ("simplex", "reference"):
            raise ValueError(f"density must be 'simplex' or 'reference', got {density!r}")
        self.scale = float(scale)
        self.density = density

    def forward(self, u: Tensor) -> Tensor:
        return self.scale * torch.softmax(u, dim=-1)

    def log_prob(self, u: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
        if self.density == "reference":
            return gaussian_log_prob(u, mean, log_std) - log_tanh_derivative(u).sum(-1)
        return self._simplex_log_prob(u, u - mean, log_std)

    def sample(self, mean: Tensor, log_std: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        if self.density == "reference":
            return super().sample(mean, log_std, noise)
        d = log_std.exp() * noise  # u − μ, without the round trip through u
        u = mean + d
        return self(u), self._simplex_log_prob(u, d, log_std)

    def _simplex_log_prob(self, u: Tensor, d: Tensor, log_std: Tensor) -> Tensor:
        """The ``"simplex"`` log π(a) of the class docstring, given u and d = u − μ.

        The per-coordinate terms −½ z_k² − log σ_k − log softmax(u)_k are added before one sum over k, and the
        constants −(K−1)/2·log 2π + ½ log K + log(s/K) − K·log s are folded into one number: the same density
        with fewer tensor operations (it runs in every SAC update, forward and backward).
        """
        k = u.shape[-1]
        precision_log = -2.0 * log_std  # log σ⁻²
        d_bar = (torch.softmax(precision_log, dim=-1) * d).sum(-1, keepdim=True)
        z = (d - d_bar) * torch.exp(-log_std)
        per_coordinate = torch.addcmul(-(log_std + torch.log_softmax(u, dim=-1)), z, z, value=-0.5)
        constant = -0.5 * (k - 1) * _LOG_2PI + 0.5 * math.log(k) + math.log(self.scale / k) - k * math.log(self.scale)
        log_p = torch.sub(per_coordinate.sum(-1), torch.logsumexp(precision_log, dim=-1), alpha=0.5)
        return log_p + constant

    def extra_repr(self) -> str:
        return f"scale={self.scale}, density={self.density!r}"
