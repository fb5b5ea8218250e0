"""Generic EPLB runtime for any PyTorch MoE model (MindIE-SD style), on torch.distributed.

Per MoE block an :class:`ExpertLoadCollector` and a :class:`DynamicDispatcher`; per rank
:func:`construct_expert_info_transfer_pool`; one scheduler process for the EP group,
``python -m vllm_eplb_plugin.runtime.scheduler``. See README, "Any PyTorch MoE".
"""

from .collector import ExpertLoadCollector
from .dispatcher import DispatcherUpdate, DynamicDispatcher
from .pool import construct_expert_info_transfer_pool

__all__ = ["ExpertLoadCollector", "DynamicDispatcher", "DispatcherUpdate", "construct_expert_info_transfer_pool"]
