"""PolicyConfig, PolicyResult, workload input, and finding policies by name."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

import vllm_eplb_plugin as eplb
from vllm_eplb_plugin import PolicyConfig, PolicyLoadError, PolicyNotFound, create_policy
from vllm_eplb_plugin.placement import default_table
from vllm_eplb_plugin.policy import as_workload


def test_public_api_from_package_root():
    for name in ("EplbPolicy", "PolicyConfig", "PolicyResult", "create_policy", "available_policies",
                 "EplbConfig", "register"):
        assert hasattr(eplb, name)


def test_core_does_not_import_vllm_or_torch_npu():
    import subprocess

    code = ("import sys, vllm_eplb_plugin, vllm_eplb_plugin.cli, vllm_eplb_plugin.policies.deepseek,"
            " vllm_eplb_plugin.planner;"
            "bad = [m for m in ('vllm', 'torch_npu', 'vllm_ascend', 'torch') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_result_unpacks_as_vllm_ascend_triple():
    table = default_table(2, 2, 3, 5)
    changed, priority, new_table = create_policy("deepseek").rebalance_experts(table, np.ones(table.shape))
    assert isinstance(changed, bool) and sorted(priority.tolist()) == [0, 1] and new_table.shape == (2, 2, 3)


def test_priority_puts_the_most_improved_layer_first():
    table = default_table(2, 2, 2, 4)
    load = np.stack([np.ones((2, 2)), np.array([[9.0, 9.0], [1.0, 1.0]])])  # layer 1 is skewed
    result = create_policy("deepseek").rebalance_experts(table, load)
    assert result.priority.tolist() == [1, 0]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_nodes": 0}, ValueError, r"num_nodes must be in \[1, 65536\]; got 0"),
        ({"num_groups": "8"}, TypeError, r"num_groups must be an integer in \[1, 65536\]; got '8'"),
        ({"max_move": -1}, ValueError, r"max_move must be in \[0, 1048576\]; got -1"),
        ({"max_move": True}, TypeError, "max_move must be an integer"),
        ({"options": {1: 2}}, TypeError, "options must be a dict with string keys"),
    ],
)
def test_policy_config_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        PolicyConfig(**kwargs)


def test_policy_options_are_checked_by_the_policy():
    assert create_policy("random", PolicyConfig(options={"seed": 3})).options == {"seed": 3}
    with pytest.raises(ValueError, match="policy 'random' has no option 'sed'; its options are: seed"):
        create_policy("random", PolicyConfig(options={"sed": 3}))
    with pytest.raises(TypeError, match="policy 'random' option 'seed' must be a int; got '3'"):
        create_policy("random", PolicyConfig(options={"seed": "3"}))
    with pytest.raises(ValueError, match="has no option 'x'; its options are: none"):
        create_policy("deepseek", PolicyConfig(options={"x": 1}))


@pytest.mark.parametrize(
    "workload, message",
    [
        (np.ones((2, 2, 2)), r"must have shape \[L, R, K\] = \[1, 2, 3\] .* got \[2, 2, 2\]"),
        (np.ones((0, 1, 2, 3)), r"got \[0, 1, 2, 3\]"),
        (np.full((1, 2, 3), np.nan), "NaN or infinite"),
        (-np.ones((1, 2, 3)), r"negative load -1.0 at index \(0, 0, 0, 0\)"),
        (np.full((1, 2, 3), "x"), "must be numeric"),
    ],
)
def test_workload_validation(workload, message):
    with pytest.raises(ValueError, match=message):
        as_workload(workload, (1, 2, 3))


def test_time_series_equals_its_sum_for_load_only_policies():
    rng = np.random.default_rng(0)
    table = default_table(2, 3, 3, 7)
    series = rng.integers(0, 50, (5, *table.shape)).astype(float)
    policy = create_policy("deepseek")
    assert np.array_equal(policy.rebalance_experts(table, series).new_table,
                          policy.rebalance_experts(table, series.sum(axis=0)).new_table)


def test_registry_lists_builtins_and_the_example_package():
    names = eplb.available_policies()
    assert {"deepseek", "random"} <= set(names)
    assert "example-lpt" in names, "CI installs policies/eplb-example-policy"
    assert type(create_policy("example-lpt")).__name__ == "LptPolicy"


@pytest.mark.parametrize("number, name", [(0, "random"), (1, "deepseek"), (2, "swift"), (3, "flashlb")])
def test_vllm_ascend_policy_types(number, name):
    assert type(create_policy(number)).name == name


def test_default_and_unknown_names():
    assert type(create_policy(None)).name == "swift"
    assert type(create_policy("default")).name == "swift"
    with pytest.raises(PolicyNotFound,
                       match=r"no EPLB policy named 'deepsek'. Did you mean 'deepseek'\? Available: .*deepseek"):
        create_policy("deepsek")
    with pytest.raises(PolicyNotFound, match=r"eplb_policy_type 7 is not one of vLLM Ascend's types"):
        create_policy(7)


def test_module_class_spec(tmp_path, monkeypatch):
    (tmp_path / "my_policies.py").write_text(textwrap.dedent("""
        from vllm_eplb_plugin.policies.deepseek import DeepSeekPolicy
        class Mine(DeepSeekPolicy):
            name = "mine"
        NotAPolicy = object
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert type(create_policy("my_policies:Mine")).name == "mine"
    with pytest.raises(PolicyLoadError, match="not a subclass of vllm_eplb_plugin.EplbPolicy"):
        create_policy("my_policies:NotAPolicy")
    with pytest.raises(PolicyLoadError, match="module 'my_policies' has no attribute 'Nope'"):
        create_policy("my_policies:Nope")
    with pytest.raises(PolicyLoadError, match="cannot import module 'no_such_mod'"):
        create_policy("no_such_mod:X")


def test_broken_entry_point_is_reported_by_name(tmp_path, monkeypatch):
    """A distribution whose policy module raises on import: listed, and create_policy
    says which entry point failed and why (not swallowed)."""
    dist = tmp_path / "broken_policy-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-policy\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vllm_eplb_plugin.policies]\nbroken = broken_policy_mod:Policy\n")
    (tmp_path / "broken_policy_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "broken" in eplb.available_policies()
    with pytest.raises(
        PolicyLoadError,
        match=r"policy 'broken' \(entry point 'broken_policy_mod:Policy'\) fails to import: "
              r"RuntimeError\('boom at import'\)",
    ):
        create_policy("broken")
    from vllm_eplb_plugin.cli import main

    assert main(["policies"]) == 1  # `vllm-eplb policies` marks it BROKEN and fails
