"""Shared test helpers."""

from __future__ import annotations

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
    """Path of vLLM Ascend's source tarball (downloaded by .ci/run), if present."""
    path = os.environ.get("VLLM_ASCEND_SDIST", "")
    return path if path and os.path.isfile(path) else None
