"""Stand-ins for what cannot exist on a CPU machine, installed in every process of the
vLLM Ascend tests (the test run, vLLM Ascend's EPLB process under spawn, our planner
child) through PYTHONPATH. Everything else is vLLM Ascend's own source from its sdist.

- ``torch_npu``: an empty module (vLLM Ascend imports it for NPU kernels).
- ``torch.npu``: one device that is not available; ``Tensor.npu()`` returns the tensor.
- ``vllm_ascend._build_info``: written by vLLM Ascend's build for a chip (A2 here).
"""

import importlib.machinery
import sys
import types

import torch

torch_npu = types.ModuleType("torch_npu")
torch_npu.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
sys.modules["torch_npu"] = torch_npu

npu = types.ModuleType("torch.npu")
npu.device_count = lambda: 1
npu.current_device = lambda: 0
npu.is_available = lambda: False
torch.npu = npu
sys.modules["torch.npu"] = npu
torch.Tensor.npu = lambda self, *args, **kwargs: self

build_info = types.ModuleType("vllm_ascend._build_info")
build_info.__device_type__ = "A2"
build_info.__soc_version__ = "ASCEND910B1"
sys.modules["vllm_ascend._build_info"] = build_info
