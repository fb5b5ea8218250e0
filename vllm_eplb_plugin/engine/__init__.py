"""Engine-specific code: vLLM hooks and adapters, vLLM Ascend's policy contract.

Nothing outside this package imports vLLM or vLLM Ascend.
"""
