"""Shared pytest setup.

* a per-test torch / numpy / random seed derived from the test id, so every test is reproducible on its own;
* a `device` fixture: "cuda" when a GPU is there, else "cpu" (kernels then run under TRITON_INTERPRET=1);
* tests marked `gpu` skip themselves when torch sees no CUDA device;
* under TRITON_INTERPRET=1 the run stops at once when numpy >= 2.3 is installed: Triton 3.6's interpreter breaks with it;
* tests/_triton_interpreter.py is imported: under TRITON_INTERPRET=1 it patches the interpreter.
"""
from __future__ import annotations

import importlib.util
import os
import random
import zlib

import pytest


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")  # as Triton reads it


def _numpy_version() -> tuple[int, int]:
    import numpy

    parts = []
    for piece in numpy.__version__.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)  # type: ignore[return-value]


def pytest_configure(config: pytest.Config) -> None:
    if _interpreting() and _numpy_version() >= (2, 3):
        import numpy

        pytest.exit(
            f"numpy {numpy.__version__} is installed but TRITON_INTERPRET=1: Triton 3.6's interpreter breaks with "
            "numpy >= 2.3. Install 'numpy<2.3' (pip install -e '.[test]' does) or run on a GPU without "
            "TRITON_INTERPRET.",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
    if importlib.util.find_spec("_triton_interpreter") is not None:
        import _triton_interpreter  # noqa: F401  (installs its patches when TRITON_INTERPRET=1, else does nothing)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _seed_for(nodeid: str) -> int:
    return zlib.crc32(nodeid.encode()) & 0x7FFFFFFF


@pytest.fixture(autouse=True)
def _seed_everything(request: pytest.FixtureRequest) -> int:
    """Seed torch (CPU and CUDA), numpy and random from the test id before each test."""
    seed = _seed_for(request.node.nodeid)
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(seed)  # also seeds every CUDA device
    except ImportError:
        pass
    return seed


@pytest.fixture
def seed(_seed_everything: int) -> int:
    """The seed this test started with."""
    return _seed_everything


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if _cuda_available() else "cpu"
