"""Peer implementations, loaded at run time from their installed or downloaded sources.

Nothing here copies a peer's code into this repository: vLLM's policy is imported from
the installed vLLM, and vLLM Ascend's files are read from its source tarball (which
``.ci/setup`` downloads into ``.cache/peers/``).
"""

from __future__ import annotations

import glob
import importlib.machinery
import os
import tarfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vllm_ascend_sdist() -> str:
    path = os.environ.get("VLLM_ASCEND_SDIST") or next(
        iter(sorted(glob.glob(os.path.join(ROOT, ".cache", "peers", "vllm_ascend-*.tar.gz")), reverse=True)), "")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            "vLLM Ascend's source tarball is missing: run `bash .ci/setup` or set VLLM_ASCEND_SDIST"
        )
    return path


def load_from_vllm_ascend(relative_path: str, module_name: str, package: str | None = None) -> types.ModuleType:
    """Execute one file of vLLM Ascend's source tree (e.g. ``examples/eplb/eplb_deepseek.py``)
    as a module and return it; ``package`` lets its relative imports resolve."""
    sdist = vllm_ascend_sdist()
    # Extracted next to the tarball (ignored by git) rather than exec'd from memory:
    # numba's on-disk cache (FlashLB uses cache=True) needs a real source file.
    path = os.path.join(sdist[: -len(".tar.gz")], relative_path)
    if not os.path.isfile(path):
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.split("/", 1)[-1] == relative_path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(tar.extractfile(member).read())
    with open(path, encoding="utf-8") as f:
        source = f.read()
    module = types.ModuleType(module_name)
    module.__file__ = path
    module.__package__ = package
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def deepseek_reference():
    """DeepSeek's original torch ``rebalance_experts`` (shipped in vLLM Ascend's examples)."""
    return load_from_vllm_ascend("examples/eplb/eplb_deepseek.py", "deepseek_eplb_reference").rebalance_experts


def vllm_default_policy():
    """vLLM's ``DefaultEplbPolicy`` class, from the installed vLLM."""
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    return DefaultEplbPolicy


_ASCEND_POLICY_PACKAGE = "vllm_ascend.eplb.core.policy"
_ASCEND_POLICIES = {  # our label -> (file in vllm_ascend/eplb/core/policy/, class)
    "vLLM Ascend DefaultEplb": ("policy_default_eplb", "DefaultEplb"),
    "vLLM Ascend SwiftBalancer": ("policy_swift_balancer", "SwiftBalanceEplb"),
    "vLLM Ascend FlashLB": ("policy_flashlb", "FlashLB"),
}
ASCEND_POLICY_LABELS = tuple(_ASCEND_POLICIES)


def _install_npu_stubs(devices_per_host: int) -> None:
    """The only NPU pieces the policies touch: ``import torch_npu``,
    ``torch.npu.device_count()`` (Swift: NPUs per host) and FlashLB's
    ``get_dynamic_eplb_group()`` (raises here, so FlashLB keeps its default thresholds,
    as it does before the group exists)."""
    import sys

    import torch

    if "torch_npu" not in sys.modules:
        stub = types.ModuleType("torch_npu")
        # A spec, so that a later find_spec("torch_npu") (transformers, imported by vLLM) works.
        stub.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
        sys.modules["torch_npu"] = stub
    # is_available: transformers (imported with vLLM) asks once torch_npu looks installed.
    torch.npu = types.SimpleNamespace(device_count=lambda: devices_per_host, is_available=lambda: False)  # type: ignore[attr-defined]
    for name in ("vllm_ascend", "vllm_ascend.distributed", "vllm_ascend.eplb", "vllm_ascend.eplb.core",
                 _ASCEND_POLICY_PACKAGE):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = []  # a package, so relative imports resolve
            sys.modules[name] = package
    if "vllm_ascend.distributed.parallel_state" not in sys.modules:
        state = types.ModuleType("vllm_ascend.distributed.parallel_state")

        def get_dynamic_eplb_group():
            raise RuntimeError("no dynamic EPLB group on this machine (stub)")

        state.get_dynamic_eplb_group = get_dynamic_eplb_group
        sys.modules[state.__name__] = state


def _load_ascend_module(stem: str) -> types.ModuleType:
    import sys

    name = f"{_ASCEND_POLICY_PACKAGE}.{stem}"
    if name not in sys.modules:
        module = load_from_vllm_ascend(f"vllm_ascend/eplb/core/policy/{stem}.py", name, package=_ASCEND_POLICY_PACKAGE)
        sys.modules[name] = module
    return sys.modules[name]


def ascend_policy(label: str, devices_per_host: int = 8):
    """A fresh instance of one of vLLM Ascend's policies (``ASCEND_POLICY_LABELS``),
    executed from its source tarball with stubs for the NPU-only imports."""
    _install_npu_stubs(devices_per_host)
    _load_ascend_module("policy_abstract")
    stem, cls = _ASCEND_POLICIES[label]
    return getattr(_load_ascend_module(stem), cls)()
