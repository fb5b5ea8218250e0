"""Conformance suite any policy author can run on their own policy.

    vllm-eplb conformance my_pkg.policies:MyPolicy
    pytest --pyargs vllm_eplb_plugin.conformance --eplb-policy my_policy

Needs ``hypothesis`` and ``pytest`` (``pip install vllm-eplb-plugin[conformance]``).
"""

from .suite import PROPERTIES, Case, Failure, Report, cases, run_conformance, run_property

__all__ = ["PROPERTIES", "Case", "Failure", "Report", "cases", "run_conformance", "run_property"]
