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


@pytest.fixture
def model_set(tmp_path):
    """A tiny fp32 Llama family with 3-shard checkpoints: base, two fine-tunes, a LoRA adapter."""
    from mergekit_lite.synthetic import build_model_set

    return build_model_set(tmp_path / "models", num_shards=3)


@pytest.fixture
def bf16_model_set(tmp_path):
    import torch

    from mergekit_lite.synthetic import build_model_set

    return build_model_set(tmp_path / "models_bf16", num_shards=2, dtype=torch.bfloat16)
