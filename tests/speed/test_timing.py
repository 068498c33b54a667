"""Which clock the speed benchmark reads."""

from __future__ import annotations

import torch

from taskbalance.speed.timing import uses_wall_time


def test_several_threads_are_timed_by_the_wall_clock_one_by_cpu_time() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert not uses_wall_time(torch.device("cpu"))
        torch.set_num_threads(2)
        assert uses_wall_time(torch.device("cpu"))  # CPU time would add up both threads' work
        assert uses_wall_time(torch.device("cuda"))
    finally:
        torch.set_num_threads(threads)
