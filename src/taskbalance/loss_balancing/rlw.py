"""RLW: random loss weighting, fresh random task weights at every step.

A litmus test for weighting schemes: in expectation every task gets weight 1, yet the noise lets training escape
regions that favour one task. Methods that cannot beat it are not balancing anything.
"""

from __future__ import annotations

from torch import Tensor

from .._random import new_generator
from ..method import fields
from .base import Balanced, LossBalancer, log_losses, random_softmax_weights


class RLW(LossBalancer):
    """ℓ̃_k = w_k · f_k, f_k = L_k (or log L_k), with w = K · softmax(u), u ~ N(0, I) drawn at every step.

    Paper: Lin, Ye, Xu, Shi, Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
    Learning" (TMLR 2022, arXiv 2111.10603).

    Args:
        seed: seed of the method's own ``torch.Generator`` (CPU). None draws one from torch's global RNG once, at
            construction; :meth:`reset` replays the same sequence, and the generator state is in ``state_dict()``.
        log_losses: weight f_k = log L_k (the IGB paper's "RLW+SI"; preset ``rlw_si``).

    Differences: we implement the paper's default (normal) distribution only. LibMTL's weights are softmax(u)
    summing to 1; we multiply by K as the Nash-MTL and IGB4MTL code does (the sum convention: E[w_k] = 1). The
    draw happens on the CPU (so runs reproduce across devices) and K numbers are copied to the device per step.
    """

    options = ("seed", "log_losses")
    state = fields("seed", "_generator")

    def __init__(self, seed: int | None = None, log_losses: bool = False) -> None:
        super().__init__()
        self._generator = new_generator(seed)
        self.seed = self._generator.initial_seed()
        self.log_losses = bool(log_losses)
        self.takes_log = self.log_losses

    def reset(self) -> None:
        super().reset()
        self._generator.manual_seed(self.seed)

    def balance(self, losses: Tensor) -> Balanced:
        weights = random_softmax_weights(self.n_tasks, self._generator, like=losses)
        values = log_losses(losses) if self.log_losses else losses
        return Balanced(losses=weights * values, weights=weights)
