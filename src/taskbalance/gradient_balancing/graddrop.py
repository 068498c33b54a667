"""GradDrop: per coordinate, keep only the gradients of one randomly chosen sign.

Where the task gradients disagree in sign, summing them lets them cancel and stalls the shared parameters (or
features) at a compromise. GradDrop instead picks a sign per coordinate, with probability given by how much of the
gradient mass has that sign, and drops the gradients of the other sign there. It works coordinate by coordinate,
so it reads J itself.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from .._random import new_generator
from ..method import fields
from .base import Combination, GradientBalancer

# Columns are processed in blocks of about this many elements, so that a block's temporaries stay in cache and J
# is read from memory once (on one CPU thread 2^18 beat 2^17 and 2^19 at K = 40, ties at K = 2 and 10: smaller
# blocks pay per-op overhead); on an accelerator the blocks only bound the scratch memory.
_BLOCK_ELEMENTS = {"cpu": 2**18}
_DEVICE_BLOCK_ELEMENTS = 2**22


def _block_columns(matrix: Tensor) -> int:
    """Columns per block for ``matrix`` (K × P)."""
    elements = _BLOCK_ELEMENTS.get(matrix.device.type, _DEVICE_BLOCK_ELEMENTS)
    return max(1, min(matrix.shape[1], elements // max(matrix.shape[0], 1)))


def scratch_size(jacobian: Tensor) -> int:
    """Elements of the scratch buffer :func:`sign_dropout` needs for J: a block of J and three block rows."""
    return (jacobian.shape[0] + 3) * _block_columns(jacobian)


def sign_dropout(jacobian: Tensor, uniform: Tensor, leak: float = 0.0, scratch: Tensor | None = None) -> Tensor:
    """Σ_k g_k ⊙ (ℓ + (1 − ℓ) M_k) for the uniform draws U (P,) (see :class:`GradDrop`).

    With S⁺ = Σ_k max(g_k, 0) and S⁻ = Σ_k min(g_k, 0) per coordinate, Σ_k |g_k| = S⁺ − S⁻ and the purity is
    P = ½ (1 + (S⁺ + S⁻)/(S⁺ − S⁻)) = S⁺/(S⁺ − S⁻), so U < P reads U·(S⁺ − S⁻) < S⁺ (no division; where every
    g_k is 0 both sides are 0 and the kept sum is 0 whichever sign wins). The masked sum is S⁺ where the
    positive sign wins and S⁻ where the negative one does, and the leak adds ℓ of the rest:
    ℓ (S⁺ + S⁻) + (1 − ℓ) S^±.

    All of it runs block of columns by block of columns, so J is read from memory once and the only allocation
    of size P is the result. ``scratch`` (:func:`scratch_size` elements of J's dtype and device, e.g. kept by
    the caller between steps) holds a block's temporaries; None allocates it.
    """
    k, p = jacobian.shape
    width = _block_columns(jacobian)
    if scratch is None:
        scratch = jacobian.new_empty(scratch_size(jacobian))
    update = jacobian.new_empty(p)
    wins = torch.empty(width, dtype=torch.bool, device=jacobian.device)
    for start in range(0, p, width):
        stop = min(start + width, p)
        n = stop - start
        block, out = jacobian[:, start:stop], update[start:stop]
        clamped = scratch[: k * n].view(k, n)
        positive, negative, mass = (scratch[(k + i) * width : (k + i) * width + n] for i in range(3))
        torch.clamp(block, min=0, out=clamped)
        torch.sum(clamped, dim=0, out=positive)
        torch.clamp(block, max=0, out=clamped)
        torch.sum(clamped, dim=0, out=negative)
        torch.sub(positive, negative, out=mass).mul_(uniform[start:stop])
        torch.lt(mass, positive, out=wins[:n])  # the positive sign wins with probability P
        torch.where(wins[:n], positive, negative, out=out)
        if leak == 1:
            torch.add(positive, negative, out=out)
        elif leak > 0:
            out.mul_(1 - leak).add_(positive.add_(negative), alpha=leak)
    return update


class GradDrop(GradientBalancer):
    """Gradient Sign Dropout: per coordinate p of the K task gradients,

        P = ½ (1 + Σ_k g_kp / Σ_k |g_kp|)      (sign purity: 1 if all positive, 0 if all negative)
        U ~ Uniform[0, 1)
        M_kp = [U < P]·[g_kp > 0] + [U ≥ P]·[g_kp < 0]
        update_p = Σ_k g_kp (ℓ + (1 − ℓ) M_kp)   (ℓ = leak)

    Paper: Z. Chen, J. Ngiam, Y. Huang, T. Luong, H. Kretzschmar, Y. Chai, D. Anguelov, "Just Pick a Sign:
    Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020, arXiv:2010.06808.

    Args:
        leak: ℓ in [0, 1], the fraction of every gradient that always passes (default 0: pure GradDrop; 1 is
            the plain sum). The paper allows one leak per task; we use one for all, as LibMTL does.
        seed: seed of the random draws. None draws one from torch's global RNG once, at construction.
        max_norm: clip the norm of the update (default None).

    Sum convention: K equal gradients give K·g (then P is 1 or 0 wherever g ≠ 0, and every gradient is kept).

    Where it applies: the paper applies GradDrop to the gradients at the shared *representation* (the layer's
    activations), summed over the batch after multiplying by the sign of the inputs. Through the engine's
    representation path this class sees exactly those per-task feature gradients (per sample: we do not
    marginalise over the batch); through the parameter path it is the per-parameter variant of the Nash-MTL and
    CAGrad reference code.

    Randomness: U is drawn on J's device from a ``torch.Generator`` owned by the method and re-seeded every step
    with (seed + step), so the state is two integers that round-trip through ``state_dict()``, nothing of size P
    crosses to the device, and a resumed run draws the same U. A seed gives different draws on CPU and CUDA.

    Differences from the reference code, and why: the reference keeps the positive sign where P > U and the
    negative one where P < U, so where U = P exactly (e.g. U = 0 at a coordinate whose gradients are all
    negative, which ``torch.rand`` draws with probability 2⁻²⁴ per coordinate) it drops every gradient; we keep
    exactly one sign everywhere. It adds ε = 1e-7 to Σ|g| (scale-dependent); we need none, comparing
    U·Σ|g| < Σ max(g, 0) (where all gradients are zero the update is 0 whichever sign wins). It averages the
    masked gradients and multiplies by K; we sum, which is the same.
    """

    needs: ClassVar[Literal["gramian", "jacobian"]] = "jacobian"
    options = ("leak", "seed")
    state = fields("seed", step=0)
    step: int  # steps so far: U is drawn from seed + step

    def __init__(self, leak: float = 0.0, seed: int | None = None, max_norm: float | None = None) -> None:
        super().__init__(max_norm=max_norm)
        if not 0 <= leak <= 1:
            raise ValueError(f"leak must be in [0, 1], got {leak}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.leak = float(leak)
        self.seed = new_generator(seed).initial_seed()
        self._generator: torch.Generator | None = None
        self._uniform: Tensor | None = None  # U, (P,), reused between steps (not state: redrawn from the seed)
        self._scratch: Tensor | None = None  # a block's temporaries, reused between steps (not state)

    def combine(self, matrix: Tensor, losses: Tensor) -> Combination:
        if self._generator is None or self._generator.device != matrix.device:
            self._generator = torch.Generator(device=matrix.device)
        self._generator.manual_seed((self.seed + self.step) % 2**63)
        self.step += 1
        # U and the block temporaries live in buffers kept between steps, not fresh P-sized allocations
        self._uniform = uniform = self._reuse(self._uniform, matrix.shape[1], matrix)
        torch.rand(matrix.shape[1], generator=self._generator, out=uniform)
        self._scratch = scratch = self._reuse(self._scratch, scratch_size(matrix), matrix)
        return Combination(direction=sign_dropout(matrix, uniform, self.leak, scratch))

    @staticmethod
    def _reuse(buffer: Tensor | None, size: int, like: Tensor) -> Tensor:
        """``buffer`` if it fits ``size`` elements of ``like``'s dtype and device, else a new one."""
        if buffer is None or buffer.numel() != size or buffer.dtype != like.dtype or buffer.device != like.device:
            return like.new_empty(size)
        return buffer
