"""Fixtures shared by every test directory. Model builders live in `tiny_models.py`."""

import pytest
from transformers import PreTrainedModel

from tiny_models import FAMILIES, build_tiny_model


@pytest.fixture(params=FAMILIES)
def tiny_model(request: pytest.FixtureRequest) -> PreTrainedModel:
    """A fresh tiny random causal LM of each supported family in turn (eval mode)."""
    return build_tiny_model(request.param)
