"""Shared test setup: small thread counts (CI has 2 cores) and the synthetic checkpoint factory."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def rng() -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(1234)
    return g
