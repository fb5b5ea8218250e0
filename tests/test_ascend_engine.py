"""The plugin inside vLLM Ascend's EPLB, on vLLM Ascend's own source (its sdist).

Both tests run pytest in a subprocess whose PYTHONPATH starts with the NPU stand-ins of
``tests/ascend/standin`` (torch_npu, torch.npu, the build's ``_build_info``), so the
stand-ins never reach the rest of the suite, and so every process vLLM Ascend starts
(its EPLB process under spawn, our planner child) gets them too.
"""

import os
import subprocess
import sys

import pytest
from conftest import require, vllm_ascend_sdist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "helpers"))
import ascend_source  # noqa: E402


@pytest.fixture(scope="module")
def sdist():
    path = vllm_ascend_sdist()
    require(path is not None, "vLLM Ascend's source tarball (.cache/peers)")
    return path


def _pytest(sdist: str, *args: str, cwd: str) -> str:
    env = dict(os.environ, PYTHONPATH=ascend_source.pythonpath(sdist) + os.pathsep + os.path.join(HERE, "ascend"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc.stdout


def test_vllm_ascends_own_eplb_tests_pass_with_the_plugin_installed(sdist):
    src = ascend_source.unpack(sdist)
    out = _pytest(sdist, "-p", "registered", "--noconftest", "--rootdir", src, "-c", os.devnull,
                  os.path.join("tests", "ut", "eplb"), cwd=src)
    assert "19 passed" in out


def test_plugin_inside_vllm_ascends_eplb(sdist):
    out = _pytest(sdist, os.path.join(HERE, "ascend"), "--rootdir", os.path.join(HERE, "ascend"), cwd=HERE)
    assert " passed" in out and "skipped" not in out
