"""The engine: how the per-task gradients of the shared parameters are obtained and the update applied.

Given the balanced losses ℓ̃ (K,), the shared parameters θ and the task-specific parameters (heads, and loss
methods' own parameters such as UW's log-variances), the engine computes what the gradient method reads — the
Jacobian J (K × P, row k = ∇_θ ℓ̃_k) or the Gramian G = J Jᵀ — lets the method combine, and accumulates

- into ``θ.grad``: the method's update (Jᵀ w, or its explicit flat direction), clipped to ``method.max_norm``;
- into every other leaf's ``.grad``: ∇ Σ_k ℓ̃_k (each head gets the gradient of its own balanced loss).

Gradients accumulate like an ordinary ``backward()`` (gradient accumulation across micro-batches works), and no
gradient leaves the device (:mod:`~taskbalance.engine.grad`). Paths (``Balancer(engine=...)``):

``"loop"``            K backward calls. The reference; works on every graph. Cost K backward passes.
``"batched"``         one backward under vmap with the K one-hot cotangents (``is_grads_batched``); K calls when
                      vmap cannot run the graph (warned once, remembered). Cost ≈ one K-batched backward, and each
                      head is run K times (the one-hot of task k still sends zeros through the other heads).
``"features"``        features-first, exact: J_z = ∂ℓ̃/∂z through the heads, then one K-batched product
                      J = J_z · ∂z/∂θ through the trunk under vmap. When the graph separates the tasks the heads
                      run once (an EW backward through them) instead of K times (:mod:`~taskbalance.engine.heads`).
                      Needs ``features`` and every path from θ to ℓ̃ running through it.
``"features_loop"``   features-first with the K trunk products taken one task at a time (no vmap).
``"gramian"``         for methods that read only G (``needs == "gramian"``): G accumulated parameter by parameter
                      during the backward, never holding J (:func:`~taskbalance.engine.vjp.streaming_gramian`),
                      then the update by one backward of Σ_k w_k ℓ̃_k restricted to θ. One more backward than the
                      other paths: it trades time for memory (K × P floats). Uses the features-first split when it
                      is exact, so the update backward then runs through the trunk only.
``"representation"``  MGDA-UB (Sener & Koltun, NeurIPS 2018, arXiv 1810.04650): an approximation, only on request.
                      The method reads J_z (or G_z = J_z J_zᵀ) instead of J; the update of θ is the trunk product of
                      the combined feature gradient Σ_k w_k ∂ℓ̃_k/∂z, or of the method's direction read as a
                      direction in feature space (flattened z). Cost ≈ one backward, plus J_z and G_z.
``"heuristic"``       the exact path a rule picks (:func:`~taskbalance.engine.paths.resolve_rule`), no timing:
                      features-first when ``features`` is given and every path from θ to ℓ̃ goes through it
                      (checked on the autograd graph), else the whole graph; the K products under vmap on
                      accelerators and one task at a time on the CPU; for a method that reads only G, ``"gramian"``
                      when J (K × P) would take more than half the memory available on the device. Deterministic:
                      what the benchmark runner uses.
``"auto"``            (default) the fastest exact path, measured: the candidates above (features-first looped or
                      under vmap when the cut is exact, the whole graph looped or under vmap, the Gramian path for
                      a G-only method) timed on the first steps of each graph signature (device, threads, shapes),
                      while those steps apply the rule's gradients bit for bit; then the fastest is kept
                      (:mod:`~taskbalance.engine.tuning`). The rule when J would not fit, or under
                      ``torch.use_deterministic_algorithms(True)``.

Two steps of a Balancer take no path at all (:meth:`Engine.step`): ``"sum"``, no gradient method
(``needs == "nothing"``), is one ordinary backward of Σ_k ℓ̃_k; ``"reuse"``, the calls between two solves of
amortised weights (:mod:`~taskbalance.engine.reuse`), is one backward of Σ_k w_k ℓ̃_k into θ.

Finiteness (``Balancer(check_finite=True)``, the default): each step checks what it computed — G, the row norms
of J, the other gradients, the summed or reused update — once for NaN/Inf (and G for overflow) before the method
combines and before ``.grad`` is written, and raises naming the task (:mod:`~taskbalance.engine.finite`).

Clipping: the shared update u is scaled by min(1, max_norm / ‖u‖). On the Gramian path ‖Jᵀw‖ = √(wᵀGw), so w
is scaled before the update backward.
"""

from __future__ import annotations

from .engine import CompiledModelWarning, Engine
from .paths import ENGINE_PATHS, EnginePath
from .tuning import PathTuner
from .vjp import EngineFallbackWarning

__all__ = ["ENGINE_PATHS", "CompiledModelWarning", "Engine", "EngineFallbackWarning", "EnginePath", "PathTuner"]
