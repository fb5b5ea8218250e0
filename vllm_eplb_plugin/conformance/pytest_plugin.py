"""pytest options of the conformance suite (registered through the ``pytest11`` entry
point, so ``pytest --pyargs vllm_eplb_plugin.conformance --eplb-policy NAME`` works)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vllm-eplb", "EPLB policy conformance")
    group.addoption("--eplb-policy", action="append", default=None, metavar="NAME",
                    help="policy to check: a registered name or package.module:Class (repeatable; "
                         "default: every registered policy)")
    group.addoption("--eplb-examples", type=int, default=100, help="generated cases per property (default 100)")
    group.addoption("--eplb-time-budget", type=float, default=2.0, help="seconds allowed per call (default 2)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "eplb_policy" in metafunc.fixturenames:
        from vllm_eplb_plugin.registry import available_policies

        names = metafunc.config.getoption("--eplb-policy") or available_policies()
        metafunc.parametrize("eplb_policy", names)
