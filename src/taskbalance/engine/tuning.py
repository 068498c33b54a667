"""``engine="auto"``: the exact paths timed on a model's first steps, and the fastest one kept.

Which exact path is cheapest is a property of the model, the device and the thread count, not of a rule: on one
CPU thread K plain backward calls through the trunk beat vmap; with several threads vmap's one batched kernel
uses them all and K small products do not; a GRU has no vmap batching rule, and vmap runs it as a slow loop over
the batch. So ``"auto"`` measures, once per *signature* — the device, the thread count, K, the dtype, the shapes
of θ and of the features without their batch dimension (a smaller last batch keeps the choice), whether the
feature cut is exact and whether the method reads only G.

Trial. The first :data:`TRIAL_STEPS` steps of a new signature run every candidate path on the step's graph (kept
between them), each timed by the wall clock with the device synchronised, in an order that rotates from step to
step. The *incumbent* — the path :func:`~taskbalance.engine.paths.resolve_rule` picks — is among them and its
gradients are the step's: **a trial step's update is the rule's update, bit for bit**, whatever was measured.
The first trial step is a warm-up whose times are dropped, except that a candidate more than :data:`DROP_FACTOR`
times slower than the fastest leaves the trial there, paid for once (vmap through a graph whose ops batch badly,
as QM9's message passing does on the CPU: 3.5× the loop). A challenger that fails — vmap cannot run the graph, or
it runs out of memory — or for which torch warns that an op has no batching rule (QM9's GRU backward under
``torch.func.vmap``, which torch then loops over the batch) leaves at once, silently: the user did not ask for
it. After the last trial step the candidate with the best time is kept when it beats the incumbent's by more than
:data:`MARGIN`; otherwise the incumbent is.

Reproducibility. Paths agree to rounding, not to the bit, and a near tie may fall either way on two runs. For
bit-for-bit reruns name a path (``engine="heuristic"`` is the rule without timing, what the benchmark runner
uses); under ``torch.use_deterministic_algorithms(True)`` ``"auto"`` takes the rule too. The choices are part of
the Balancer's ``state_dict()``: a run resumed from a checkpoint written after its trial takes the same path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .paths import TIMED_PATHS

#: trial steps per signature; the first is a warm-up (four timed: near ties between paths are common)
TRIAL_STEPS = 5
#: a challenger replaces the incumbent only when its best time is below (1 - MARGIN) × the incumbent's
MARGIN = 0.05
#: a candidate this many times slower than the fastest in the warm-up leaves the trial there
DROP_FACTOR = 2.0


def signature(
    balanced: Tensor, shared: Sequence[Tensor], features: Tensor | None, exact_cut: bool, gramian_only: bool
) -> str:
    """What the fastest path depends on, as a short readable string (θ's shapes as a digest)."""
    shapes = ";".join(",".join(map(str, p.shape)) for p in shared)
    digest = hashlib.sha1(shapes.encode(), usedforsecurity=False).hexdigest()[:12]
    feature_shape = "-" if features is None else "x".join(map(str, features.shape[1:])) or "scalar"
    return (
        f"{balanced.device.type}|threads={torch.get_num_threads()}|K={balanced.shape[0]}|{balanced.dtype}|"
        f"theta={len(shared)}:{digest}|z={feature_shape}|cut={int(exact_cut)}|G={int(gramian_only)}"
    )


def decide(best: Mapping[str, float], incumbent: str, margin: float = MARGIN) -> str:
    """The path kept after a trial, from each remaining candidate's best time: the fastest when it beats the
    incumbent by more than ``margin``, else the incumbent (ties between challengers go to the first listed)."""
    if incumbent not in best:
        return min(best, key=best.__getitem__)
    fastest = min(best, key=best.__getitem__)
    return fastest if best[fastest] < (1.0 - margin) * best[incumbent] else incumbent


@dataclass
class Trial:
    """The timing of one signature's candidates over its trial steps."""

    incumbent: str
    candidates: list[str]
    step: int = 0
    times: dict[str, list[float]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)

    def order(self) -> list[str]:
        """This step's candidates, rotated by the step so that no path always runs first (cold) or last."""
        live = [c for c in self.candidates if c not in self.dropped]
        shift = self.step % len(live)
        return live[shift:] + live[:shift]

    def record(self, candidate: str, seconds: float) -> None:
        self.times.setdefault(candidate, []).append(seconds)

    def drop(self, candidate: str, why: str) -> None:
        """Take a challenger out of the trial (never the incumbent: its gradients are the step's)."""
        if candidate != self.incumbent:
            self.dropped[candidate] = why

    def end_step(self) -> str | None:
        """Close a trial step; the chosen path after the last one, else None."""
        if self.step == 0:  # warm-up: its times go, the far slower candidates too
            fastest = min(t[-1] for c, t in self.times.items() if c not in self.dropped)
            for candidate, seconds in self.times.items():
                if candidate not in self.dropped and seconds[-1] > DROP_FACTOR * fastest:
                    self.drop(candidate, f"{seconds[-1] / fastest:.1f}x the fastest in the warm-up")
            self.times.clear()
        self.step += 1
        if self.step < TRIAL_STEPS:
            return None
        return decide(self.best(), self.incumbent)

    def best(self) -> dict[str, float]:
        """Each remaining candidate's best time over the timed steps (seconds)."""
        return {c: min(t) for c, t in self.times.items() if c not in self.dropped and t}


class PathTuner:
    """The paths ``"auto"`` chose, per signature, and the trial of a signature still being timed."""

    def __init__(self) -> None:
        self.chosen: dict[str, str] = {}
        #: per signature: the best time of each candidate of its trial (seconds), and why others left it
        self.timings: dict[str, dict[str, float]] = {}
        self.dropped: dict[str, dict[str, str]] = {}
        self.trials: dict[str, Trial] = {}

    def trial(self, key: str, incumbent: str, candidates: Sequence[str]) -> Trial | None:
        """The trial of ``key`` (started now if new); None when ``key`` is decided or has one candidate."""
        if key in self.chosen:
            return None
        if len(candidates) < 2:
            self.chosen[key] = incumbent
            return None
        found = self.trials.get(key)
        if found is None:
            found = self.trials[key] = Trial(incumbent, list(candidates))
        return found

    def end_step(self, key: str) -> None:
        trial = self.trials[key]
        choice = trial.end_step()
        if choice is not None:
            self.chosen[key] = choice
            self.timings[key] = trial.best()
            self.dropped[key] = dict(trial.dropped)
            del self.trials[key]

    def state(self) -> dict[str, dict[str, str]]:
        """What a checkpoint keeps: the choices (a trial in progress starts again; its steps are the rule's)."""
        return {"auto_paths": dict(self.chosen)}

    def load(self, state: Mapping[str, object]) -> None:
        """Take the choices of a saved state (none in a state saved before ``"auto"`` measured)."""
        chosen = state.get("auto_paths", {})
        if not isinstance(chosen, dict) or not all(v in TIMED_PATHS for v in chosen.values()):
            raise ValueError(f"the engine's auto_paths in the state must map signatures to exact paths, not {chosen!r}")
        self.chosen = {str(k): str(v) for k, v in chosen.items()}
        self.trials.clear()
        for key in [k for k in self.timings if k not in self.chosen]:
            del self.timings[key]
            self.dropped.pop(key, None)

    def reset(self) -> None:
        self.chosen.clear()
        self.timings.clear()
        self.dropped.clear()
        self.trials.clear()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that the wall clock measures it (nothing to wait for on the CPU)."""
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    wait = getattr(backend, "synchronize", None)
    if callable(wait):
        wait()
