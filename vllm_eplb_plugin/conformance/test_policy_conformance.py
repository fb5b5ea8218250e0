"""The conformance properties as pytest tests, one per (policy, property)."""

from __future__ import annotations

import pytest

from vllm_eplb_plugin.conformance.suite import PROPERTIES, run_property
from vllm_eplb_plugin.registry import load_policy_class


@pytest.mark.parametrize("prop", list(PROPERTIES))
def test_property(eplb_policy: str, prop: str, request: pytest.FixtureRequest) -> None:
    cls = load_policy_class(eplb_policy)
    failure = run_property(cls, prop, request.config.getoption("--eplb-examples"),
                           request.config.getoption("--eplb-time-budget"))
    if failure is not None:
        pytest.fail(f"{eplb_policy}: {failure.prop}: {failure.error}\n{failure.example}", pytrace=False)
