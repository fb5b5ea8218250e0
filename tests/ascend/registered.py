"""pytest plugin: install the plugin's vLLM Ascend hooks before vLLM Ascend's tests run
(``-p registered``), as ``register()`` does in a vLLM Ascend worker."""

from vllm_ascend.eplb.core.policy.policy_factory import PolicyFactory

from vllm_eplb_plugin.engine.ascend_hooks import install_ascend

install_ascend()
assert getattr(PolicyFactory.__dict__["generate_policy"], "_vllm_eplb_plugin_patched", False)
