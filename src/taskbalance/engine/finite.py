"""The one finiteness check of a step's gradients, made before the method combines and before ``.grad`` is written.

A loss can be finite while its gradient is not (``1e-30 * sqrt(z)`` at z = 0), and finite float32 gradients of
norm ≳ 1.8e19 give an infinite G = J Jᵀ. Either way a method would hand back NaN (or a wrong number) and the
engine would write it into ``.grad``. Each step reduces what it computed to one small tensor — G (K × K), the
row norms of J (K,), the norm of each other gradient (one fused ``_foreach_norm``, as ``clip_grad_norm_`` takes)
— and reads one bool from it: no more host synchronisations than that read. A NaN or Inf anywhere makes these
non-finite. Only then is more computed: whether an other gradient really holds one (its norm may merely
overflow, which is no error there), and the message.

:func:`require_finite` is the only place that decides what a non-finite step does: raise
:class:`NonFiniteGradientError`, which a Balancer given a GradScaler turns into a skipped step (an update of Inf
that the scaler skips, every method's state as before). On a process group whose ranks check their own gradients
(``distributed="local"``) the verdict is agreed first, so that every rank raises or none does.
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


class NonFiniteGradientError(ValueError):
    """A gradient of finite losses is NaN or Inf (or G = J Jᵀ overflows): the step cannot be balanced."""


def _present(tensors: Sequence[Tensor | None]) -> list[Tensor]:
    return [t.detach() for t in tensors if t is not None and t.numel() > 0]


def norms(tensors: Sequence[Tensor | None]) -> Tensor | None:
    """‖t‖ of each present tensor in one fused reduction: non-finite when t holds NaN/Inf (or ‖t‖² overflows)."""
    present = _present(tensors)
    if not present:
        return None
    return torch.stack([n.float() for n in torch._foreach_norm(present)])


def row_norms(matrix: Tensor) -> Tensor:
    """‖J_k‖ per row: NaN for a row holding NaN, Inf for one holding Inf or whose squared norm overflows."""
    norms: Tensor = torch.linalg.vector_norm(matrix.reshape(matrix.shape[0], -1), dim=1)
    return norms


def require_finite(
    per_task: Tensor | None,
    others: Sequence[Tensor | None] = (),
    *,
    rows_finite: Callable[[], Tensor] | None = None,
    agree: Callable[[bool], bool] | None = None,
) -> None:
    """Raise one :class:`NonFiniteGradientError` unless every gradient of this step is finite.

    Args:
        per_task: G (K × K) or the row norms of J (K,), or None (no per-task gradients on this path).
        others: further gradients (the task parameters', or the summed update) checked for NaN/Inf only.
        rows_finite: on failure, whether each row of J has only finite entries (K,), to tell a non-finite
            gradient from an overflowing norm; without it that is told from G's diagonal where it can be.
        agree: the verdict of every rank from this rank's (True: all finite), when each rank checks its own.
    """
    finite = _finite(per_task, others)
    if agree is not None and not agree(finite) and finite:
        raise NonFiniteGradientError(f"another rank's gradient is non-finite (NaN or Inf). {_ADVICE}")
    if finite:
        return
    broken = [i for i, t in enumerate(_present(others)) if not bool(torch.isfinite(t).all())]
    raise NonFiniteGradientError(_describe(per_task, len(broken), rows_finite))


def _finite(per_task: Tensor | None, others: Sequence[Tensor | None]) -> bool:
    """Whether the step may go on: no NaN/Inf anywhere (an other gradient whose norm merely overflows is finite)."""
    parts = [] if per_task is None else [per_task.detach().reshape(-1).float()]
    sizes = norms(others)
    if sizes is not None:
        parts.append(sizes)
    if not parts or bool(torch.isfinite(torch.cat(parts)).all()):
        return True
    broken = any(not bool(torch.isfinite(t).all()) for t in _present(others))
    return not broken and (per_task is None or bool(torch.isfinite(per_task).all()))


def _describe(per_task: Tensor | None, broken: int, rows_finite: Callable[[], Tensor] | None) -> str:
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
    return (
        f"the gradient of {broken} parameter tensor(s) is non-finite (NaN or Inf) although the losses are finite: "
        "of a task-specific parameter, or of any parameter on a step that takes no per-task gradients (which task "
        f"is then not known). {_ADVICE}"
    )
