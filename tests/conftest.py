"""Shared fixtures: offline environment, toy models of each family, the real default model (slow)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from atlas_core.models import load_model  # noqa: E402
from atlas_core.toy import FAMILIES  # noqa: E402


@pytest.fixture(params=FAMILIES)
def toy_lm(request):
    """A tiny random model of each supported family."""
    return load_model(f"toy-{request.param}")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (converted once into the user cache)."""
    return load_model("smollm2-135m")
