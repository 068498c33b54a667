"""The one finiteness check of a step's gradients, made before the method combines and before ``.grad`` is written.

A loss can be finite while its gradient is not (``1e-30 * sqrt(z)`` at z = 0), and finite float32 gradients of
norm ≳ 1.8e19 give an infinite G = J Jᵀ. Either way a method would hand back NaN (or a wrong number) and the
engine would write it into ``.grad``. Each step reduces what it computed to one small tensor — G (K × K), the
row norms of J (K,), the largest |entry| of each other gradient — and reads one bool from it: no more host
synchronisations than that read. The message is built only on failure.

:func:`require_finite` is the only place that decides what a non-finite step does (today: raise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: what to do instead, said in every refusal
_ADVICE = (
    "Nothing was changed. Fix the computation there (sqrt, log or a division at 0 has an infinite derivative; add "
    "a small constant), scale that loss down, or pass Balancer(check_finite=False) to let non-finite values through."
)


def max_abs(tensors: Sequence[Tensor | None]) -> Tensor | None:
    """The largest |entry| of each present tensor (NaN where a tensor holds NaN), in one fused reduction."""
    present = [t.detach() for t in tensors if t is not None and t.numel() > 0]
    if not present:
        return None
    return torch.stack([n.float() for n in torch._foreach_norm(present, float("inf"))])


def row_norms(matrix: Tensor) -> Tensor:
    """‖J_k‖ per row: NaN for a row holding NaN, Inf for one holding Inf or whose squared norm overflows."""
    norms: Tensor = torch.linalg.vector_norm(matrix.reshape(matrix.shape[0], -1), dim=1)
    return norms


def require_finite(
    per_task: Tensor | None,
    others: Sequence[Tensor | None] = (),
    *,
    rows_finite: Callable[[], Tensor] | None = None,
) -> None:
    """Raise one ValueError unless every gradient of this step is finite.

    Args:
        per_task: G (K × K) or the row norms of J (K,), or None (no per-task gradients on this path).
        others: further gradients (the task parameters', or the summed update) checked for NaN/Inf only.
        rows_finite: on failure, whether each row of J has only finite entries (K,), to tell a non-finite
            gradient from an overflowing norm; without it that is told from G's diagonal where it can be.
    """
    parts = [] if per_task is None else [per_task.detach().reshape(-1).float()]
    largest = max_abs(others)
    if largest is not None:
        parts.append(largest)
    if not parts or bool(torch.isfinite(torch.cat(parts)).all()):
        return
    raise ValueError(_describe(per_task, largest, rows_finite))


def _describe(per_task: Tensor | None, largest: Tensor | None, rows_finite: Callable[[], Tensor] | None) -> str:
    if per_task is not None and not bool(torch.isfinite(per_task).all()):
        scale = per_task if per_task.dim() == 1 else per_task.diagonal()  # ‖g_k‖ or ‖g_k‖²: a NaN row of J
        bad = torch.nonzero(~torch.isfinite(scale)).flatten()  # spreads over G's row, not over its diagonal
        if rows_finite is not None:
            nonfinite = set(torch.nonzero(~rows_finite()).flatten().tolist())
        else:
            nonfinite = set(torch.nonzero(torch.isnan(scale)).flatten().tolist())
        overflow = sorted(set(bad.tolist()) - nonfinite)
        found = []
        if nonfinite:
            found.append(
                f"the gradient of the shared parameters is non-finite (NaN or Inf) for task(s) {sorted(nonfinite)}, "
                "although the losses are finite"
            )
        if overflow:
            found.append(
                f"the gradient of task(s) {overflow} is finite but too large: its squared norm overflows "
                f"{per_task.dtype} (norm ≳ {torch.finfo(per_task.dtype).max ** 0.5:.1e}), so G = J Jᵀ and every "
                "method reading it would be NaN, or the gradient holds an Inf"
            )
        return "; ".join(found) + ". " + _ADVICE
    count = 0 if largest is None else int((~torch.isfinite(largest)).sum())
    return (
        f"the gradient of {count} parameter tensor(s) is non-finite (NaN or Inf) although the losses are finite "
        f"(this path takes no per-task gradients, so the task is not known). {_ADVICE}"
    )
