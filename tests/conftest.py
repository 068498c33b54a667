"""Shared test configuration: hypothesis profiles (CI is derandomised) and fixtures."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings
from torch import Tensor

from tests.models import TinyMTL, make_data

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def tiny() -> tuple[TinyMTL, Tensor, Tensor]:
    model = TinyMTL()
    x, y = make_data()
    return model, x, y
