"""The experiment runner behind ``taskbalance run``: one training run (:mod:`.training`), its checkpoints
(:mod:`.checkpoint`), and the comparison of methods against single-task baselines (:mod:`.compare`)."""

from ..extras import require

require("numpy", "tqdm", what="the benchmark runner")
