"""The README's code blocks run as they are: the training-loop section's Python blocks, in order, in one namespace."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch._functorch.config as functorch_config

README = Path(__file__).resolve().parent.parent / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : None if end < 0 else end]


def _python_blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_training_loop_section_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tensorboard", reason="the logging block writes TensorBoard events: pip install tensorboard")
    blocks = _python_blocks(_section("In your training loop: AMP, accumulation, compile, logging"))
    assert len(blocks) == 5
    namespace: dict[str, object] = {}
    # the blocks set torch's compile configuration as a user would: restored afterwards for the other tests
    with warnings.catch_warnings(), functorch_config.patch(donated_buffer=functorch_config.donated_buffer):
        warnings.simplefilter("ignore")
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("False ")  # no step skipped
    assert printed[1].startswith("train/weight/left,train/weight/right")
    assert namespace["result"].skipped is False  # type: ignore[attr-defined]
