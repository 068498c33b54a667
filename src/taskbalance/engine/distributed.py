"""Balancing the global batch of a ``torch.distributed`` process group: what the ranks exchange, and when.

Data parallelism splits a batch into equal shards, one per rank; with mean-reduced losses the global batch's loss
of task k is L_k = (1/R) Σ_r L_k^(r), and every gradient of it is the mean over ranks of the shards' gradients.
(Shards of unequal sizes n_r, as DDP, count equally: pass L^(r) · R·n_r/n to weigh every sample alike, as
``taskbalance run --nproc`` does for a last, smaller batch.)
A balancer that works on each shard alone solves R different problems, so the ranks drift apart. Here:

- **Losses** (every mode): each rank contributes its K raw losses and a signature of what it balances (the
  number, sizes and shapes of the shared parameters and of the other leaves) to one ``all_gather`` of K + 5
  float64 numbers; every rank then takes the mean in rank order (the same bits everywhere) and refuses a
  signature that differs. The loss method sees that mean through ``L_r - L_r.detach() + L``: the value is L
  exactly, the gradient flows into the rank's own graph. So the loss method's state (IGB baselines, DWA
  history, FAMO, UW, IGBv2's agent and replay buffer, random streams) evolves identically on every rank, and
  its chain-rule factor ∂ℓ̃/∂L is the global batch's.
- **exact** (default): the rank's per-task gradients J_r = (∂ℓ̃/∂L) ∂L^(r)/∂θ are averaged over ranks into the
  global batch's J, together with the task parameters' gradients: one ``all_reduce`` of K·P + P_task floats.
  Every rank then solves the same problem and writes the same update. Steps without per-task gradients (no
  gradient method, reused weights) all-reduce their gradients like DDP does: P + P_task floats.
- **local**: each rank solves on its own J_r; the update and the task parameters' gradients are averaged (P +
  P_task floats, DDP's own traffic). An approximation of the method: mean_r f(J_r) instead of f(mean_r J_r). The
  loss level stays exact; a gradient method's own state (GradVac's EMA, warm starts) is each rank's own.

On the first step (and after ``reset``/``load_state_dict``) the ranks check that they hold the same balancer
(class, options, K) and take rank 0's state, as DDP takes rank 0's parameters: methods seeded from the global RNG
start alike. The engine takes its gradients with ``torch.autograd.grad``, which runs none of DDP's hooks: a model
wrapped in ``DistributedDataParallel`` communicates nothing on these steps and is reduced exactly once, here.

Every decision that could differ between ranks is made on gathered values, so that either all ranks go on or all
raise the same error: a rank that raised alone would leave the others waiting in a collective forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

DistributedMode = Literal["exact", "local", "none"]
DISTRIBUTED_MODES: tuple[str, ...] = ("exact", "local", "none")
#: what a rank balances, gathered with its losses (see :func:`signature`): must be the same on every rank
_SIGNATURE = 5


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def check_mode(mode: str) -> None:
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed must be one of {', '.join(DISTRIBUTED_MODES)}; got {mode!r}")


class Ranks:
    """The ranks of one process group a balancer balances over (world size > 1), and their exchanges."""

    def __init__(self, mode: DistributedMode, group: Any, world: int, rank: int) -> None:
        self.mode = mode
        self.group = group
        self.world = world
        self.rank = rank
        # where the group's collectives take their tensors: NCCL only reduces CUDA tensors
        nccl = _dist().get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    @classmethod
    def of(cls, mode: DistributedMode, group: Any = None) -> Ranks | None:
        """The ranks of ``group`` (default: the world), or None when there is nothing to balance over.

        None for ``mode="none"``, when ``torch.distributed`` is not initialised, and for a group of one rank.
        """
        if mode == "none":
            return None
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise ValueError("a process group was given but torch.distributed is not initialised")
            return None
        world = int(dist.get_world_size(group))
        if world < 2:
            return None
        return cls(mode, group, world, int(dist.get_rank(group)))

    @property
    def exact(self) -> bool:
        return self.mode == "exact"

    def __repr__(self) -> str:
        return f"Ranks(mode={self.mode!r}, world={self.world}, rank={self.rank})"

    # -- losses ------------------------------------------------------------------------------------------------
    def gather_losses(self, losses: Tensor, signature: Sequence[float]) -> Tensor:
        """Every rank's K raw losses (R, K), gathered (on the group's device) with a :func:`signature` that must be
        the same on every rank."""
        size = _SIGNATURE
        row = torch.cat([losses.detach().double(), torch.tensor(signature, dtype=torch.float64)]).to(self.device)
        rows = [torch.empty_like(row) for _ in range(self.world)]
        _dist().all_gather(rows, row, group=self.group)
        gathered = torch.stack(rows).to(losses.device)
        differ = (gathered[:, -size:] != gathered[0, -size:]).any(dim=1)
        if bool(differ.any()):
            raise ValueError(
                f"ranks {torch.nonzero(differ).flatten().tolist()} balance other parameters than rank 0 (number, "
                "sizes or shapes of the shared parameters or of the task parameters differ): every rank must pass "
                "the same shared_params of the same model, or the global batch cannot be balanced exactly"
            )
        return gathered[:, :-size]

    @staticmethod
    def mean_of(gathered: Tensor, like: Tensor) -> Tensor:
        """The global batch's losses: the mean over ranks, in rank order, in the dtype of ``like``."""
        return (gathered.sum(dim=0) / gathered.shape[0]).to(like.dtype)

    # -- gradients ---------------------------------------------------------------------------------------------
    def mean(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The mean over ranks of each tensor: one ``all_reduce`` per dtype over one flat buffer (new tensors)."""
        out: list[Tensor] = list(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for indices in by_dtype.values():
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in indices])
            _dist().all_reduce(flat, group=self.group)
            flat.div_(self.world)
            pieces = torch.split(flat, [tensors[i].numel() for i in indices])
            for i, piece in zip(indices, pieces, strict=True):
                out[i] = piece.view(tensors[i].shape)
        return out

    def mean_grads(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """The mean over ranks of the gradients of ``params``; a missing one counts as zeros (as DDP takes it)."""
        filled = [p.new_zeros(p.shape) if g is None else g for p, g in zip(params, grads, strict=True)]
        reduced: list[Tensor | None] = list(self.mean(filled))
        return reduced

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (one ``all_reduce`` of one number)."""
        value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.device)
        _dist().all_reduce(value, op=_dist().ReduceOp.MIN, group=self.group)
        return bool(value.item() == 1.0)

    # -- the balancer itself ------------------------------------------------------------------------------------
    def align(self, balancer: nn.Module, identity: str) -> None:
        """Refuse balancers that differ between ranks, then give every rank rank 0's state."""
        dist = _dist()
        identities: list[Any] = [None] * self.world
        dist.all_gather_object(identities, identity, group=self.group)
        differ = [r for r, other in enumerate(identities) if other != identities[0]]
        if differ:
            raise ValueError(
                f"ranks {differ} hold another balancer than rank 0 ({identities[differ[0]]} vs {identities[0]}): "
                "build the same method with the same options and number of tasks on every rank"
            )
        state = [{k: _to_cpu(v) for k, v in balancer.state_dict().items()} if self.rank == 0 else None]
        dist.broadcast_object_list(state, src=dist.get_global_rank(self.group or dist.group.WORLD, 0), group=self.group)
        if self.rank != 0 and state[0] is not None:
            balancer.load_state_dict(state[0])


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return type(value)((k, _to_cpu(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def signature(shared: Sequence[Tensor], others: Sequence[Tensor]) -> list[float]:
    """What a rank balances, as :data:`_SIGNATURE` float64-exact numbers: the counts, sizes and a hash of the shapes
    of the shared parameters and of the other leaves."""
    shapes = hash((tuple(tuple(p.shape) for p in shared), tuple(tuple(p.shape) for p in others))) % 2**52
    return [
        float(len(shared)),
        float(sum(p.numel() for p in shared)),
        float(len(others)),
        float(sum(p.numel() for p in others)),
        float(shapes),
    ]


#: the signature of a call that balances nothing (``after_step``)
NO_SIGNATURE = [0.0] * _SIGNATURE
