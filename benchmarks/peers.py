"""Peer implementations, loaded at run time from their installed or downloaded sources.

Nothing here copies a peer's code into this repository: vLLM's policy is imported from
the installed vLLM, and vLLM Ascend's files are read from its source tarball (which
``.ci/setup`` downloads into ``.cache/peers/``).
"""

from __future__ import annotations

import glob
import os
import tarfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vllm_ascend_sdist() -> str:
    path = os.environ.get("VLLM_ASCEND_SDIST") or next(
        iter(sorted(glob.glob(os.path.join(ROOT, ".cache", "peers", "vllm_ascend-*.tar.gz")), reverse=True)), "")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError("vLLM Ascend's source tarball is missing: run `bash .ci/setup` or set VLLM_ASCEND_SDIST")
    return path


def load_from_vllm_ascend(relative_path: str, module_name: str) -> types.ModuleType:
    """Execute one file of vLLM Ascend's source tree (e.g. ``examples/eplb/eplb_deepseek.py``)
    as a module and return it."""
    sdist = vllm_ascend_sdist()
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.split("/", 1)[-1] == relative_path)
        source = tar.extractfile(member).read().decode()
    module = types.ModuleType(module_name)
    module.__file__ = f"{sdist}!{relative_path}"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def deepseek_reference():
    """DeepSeek's original torch ``rebalance_experts`` (shipped in vLLM Ascend's examples)."""
    return load_from_vllm_ascend("examples/eplb/eplb_deepseek.py", "deepseek_eplb_reference").rebalance_experts


def vllm_default_policy():
    """vLLM's ``DefaultEplbPolicy`` class, from the installed vLLM."""
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    return DefaultEplbPolicy
