"""Expert-parallel load balancing (EPLB) for MoE inference, as a vLLM plugin.

The core (placement model, policies, config) needs only numpy; nothing here imports
vLLM, vLLM Ascend or torch_npu.
"""

from .config import EplbConfig, EplbConfigError
from .placement import InvalidExpertTable, load_expert_map, save_expert_map, validate_table
from .policy import EplbPolicy, Option, PlacementPolicy, PolicyConfig, PolicyResult
from .registry import PolicyLoadError, PolicyNotFound, available_policies, create_policy

__version__ = "0.1.0"

__all__ = [
    "EplbConfig",
    "EplbConfigError",
    "EplbPolicy",
    "InvalidExpertTable",
    "Option",
    "PlacementPolicy",
    "PolicyConfig",
    "PolicyLoadError",
    "PolicyNotFound",
    "PolicyResult",
    "available_policies",
    "create_policy",
    "load_expert_map",
    "register",
    "save_expert_map",
    "validate_table",
]


def register() -> None:
    """vLLM general-plugin entry point (``vllm.general_plugins``).

    vLLM calls it in every process it starts. It installs the hooks that process needs
    (config check where engine args live, collector and planning loop in workers); each
    hook does nothing unless ``--additional-config`` has an ``eplb`` (or vLLM Ascend
    ``eplb_config``) section. Safe to call twice.
    """
    from .engine.vllm_hooks import install

    install()
