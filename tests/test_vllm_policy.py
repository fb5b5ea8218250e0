"""Our policies behind vLLM's AbstractEplbPolicy, checked with vLLM's own map code."""

import numpy as np
import pytest
from conftest import import_peer

torch = import_peer("torch")
import_peer("vllm")

from vllm.distributed.eplb import eplb_state  # noqa: E402
from vllm.distributed.eplb.policy import EPLB_POLICIES, AbstractEplbPolicy  # noqa: E402

from vllm_eplb_plugin.config import EplbConfig  # noqa: E402
from vllm_eplb_plugin.engine.vllm_policy import install_vllm_policy, vllm_policy_class  # noqa: E402
from vllm_eplb_plugin.moves import repair_table  # noqa: E402
from vllm_eplb_plugin.placement import default_table, expert_to_slot_load, validate_table  # noqa: E402
from vllm_eplb_plugin.policies.deepseek import DeepSeekPolicy  # noqa: E402
from vllm_eplb_plugin.policy import PolicyConfig  # noqa: E402


@pytest.fixture
def restore_policies():
    saved = dict(EPLB_POLICIES)
    yield
    EPLB_POLICIES.clear()
    EPLB_POLICIES.update(saved)


def test_install_puts_our_policy_where_eplb_state_looks(restore_policies):
    cls = install_vllm_policy(EplbConfig(policy="deepseek", max_move=3))
    # EplbState resolves EPLB_POLICIES[eplb_config.policy] through its own module global.
    assert eplb_state.EPLB_POLICIES["default"] is cls
    assert issubclass(cls, AbstractEplbPolicy) and cls.plugin_policy.config.max_move == 3


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("groups, nodes", [(1, 1), (4, 2)])
@pytest.mark.parametrize("with_old", [True, False])
def test_adapter_output_through_vllm_compute_logical_maps(seed, groups, nodes, with_old):
    rng = np.random.default_rng(seed)
    layers, experts, ranks, slots = 3, 16, 4, 5  # 20 physical slots: 4 redundant
    weight = torch.from_numpy(rng.zipf(1.4, size=(layers, experts)).astype(np.float32))
    old = default_table(layers, ranks, slots, experts)
    if with_old:
        old = DeepSeekPolicy().rebalance_experts(old, expert_to_slot_load(old, rng.random((layers, experts)))).new_table
    cls = vllm_policy_class(DeepSeekPolicy())
    phy2log = cls.rebalance_experts(
        weight, ranks * slots, groups, nodes, ranks, torch.from_numpy(old.reshape(layers, -1)) if with_old else None
    )
    assert phy2log.shape == (layers, ranks * slots) and phy2log.dtype == torch.int64
    table = validate_table(phy2log.numpy().reshape(layers, ranks, slots), experts)

    # What vLLM derives from it: every logical expert's replicas, exactly the slots holding it.
    log2phy, count = eplb_state.compute_logical_maps(phy2log, experts)
    for l in range(layers):
        for e in range(experts):
            slots_of_e = sorted(np.flatnonzero(phy2log[l].numpy() == e).tolist())
            assert count[l, e].item() == len(slots_of_e) >= 1
            assert sorted(x for x in log2phy[l, e].tolist() if x >= 0) == slots_of_e

    # And it is our policy's plan for the same inputs (vLLM's groups/nodes win).
    start = old if with_old else default_table(layers, ranks, slots, experts)
    ours = DeepSeekPolicy(PolicyConfig(num_nodes=nodes, num_groups=groups)).rebalance_experts(
        start, expert_to_slot_load(start, weight.double().numpy())
    )
    np.testing.assert_array_equal(table, ours.new_table)


def test_adapter_rejects_replicas_that_do_not_divide():
    cls = vllm_policy_class(DeepSeekPolicy())
    with pytest.raises(ValueError, match="num_replicas=10 is not a multiple of num_ranks=4"):
        cls.rebalance_experts(torch.ones(1, 8), 10, 1, 1, 4)


def _phy2log(cls, weight, ranks, slots, old):
    return cls.rebalance_experts(weight, ranks * slots, 1, 1, ranks, None if old is None else torch.from_numpy(old))


def test_a_failing_policy_keeps_vllms_map_instead_of_stopping_its_engine(caplog):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from flaky_policies import InvalidTablePolicy, RaisingPolicy

    old = DeepSeekPolicy().rebalance_experts(default_table(2, 4, 3, 10), np.ones((2, 4, 3))).new_table
    weight = torch.from_numpy(np.random.default_rng(0).zipf(1.5, size=(2, 10)).astype(np.float32))
    for policy, reason in [(RaisingPolicy(), "RuntimeError: boom from RaisingPolicy"),
                           (InvalidTablePolicy(), "InvalidExpertTable: policy's new table")]:
        with caplog.at_level("ERROR", logger="vllm.eplb_plugin"):
            out = _phy2log(vllm_policy_class(policy), weight, 4, 3, old.reshape(2, -1))
        np.testing.assert_array_equal(out.numpy().reshape(old.shape), old)
        assert f"failed inside vLLM's EplbState, keeping the placement: {reason}" in caplog.text


def test_maps_our_invariants_cannot_start_from_are_planned_afresh_or_kept():
    weight = torch.from_numpy(np.random.default_rng(1).zipf(1.5, size=(2, 8)).astype(np.float32))
    cls = vllm_policy_class(DeepSeekPolicy())
    # Elastic EP pads the old map with -1: plan from it with those slots repaired.
    padded = default_table(2, 4, 3, 8).reshape(2, -1).copy()
    padded[:, -3:] = -1
    out = _phy2log(cls, weight, 4, 3, padded).numpy().reshape(2, 4, 3)
    validate_table(out, 8)
    start = repair_table(padded.reshape(2, 4, 3), 8)
    ours = DeepSeekPolicy().rebalance_experts(start, expert_to_slot_load(start, weight.double().numpy())).new_table
    np.testing.assert_array_equal(out, ours)
    # One rank with more slots than experts (vLLM's own initial map repeats experts): kept.
    single = (np.arange(10) % 8)[None].repeat(2, axis=0)
    out = _phy2log(cls, weight, 1, 10, single).numpy()
    np.testing.assert_array_equal(out, single)
    np.testing.assert_array_equal(_phy2log(cls, weight, 1, 10, None).numpy(), single)  # no old map: vLLM's own


def test_our_policies_plan_from_the_maps_vllms_policy_makes():
    """vLLM's DefaultEplbPolicy puts an expert twice on a GPU on skewed loads; a deployment
    that switches to ours starts from such a map and must get a valid plan."""
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    from vllm_eplb_plugin.registry import available_policies, create_policy

    rng = np.random.default_rng(0)
    with_duplicates = 0
    for _ in range(60):
        layers, ranks, slots = 2, int(rng.integers(2, 6)), int(rng.integers(2, 5))
        experts = int(rng.integers(max(slots, ranks * slots - ranks), ranks * slots + 1))
        weight = torch.from_numpy(rng.zipf(1.2, size=(layers, experts)).astype(np.float32))
        phy2log = DefaultEplbPolicy.rebalance_experts(weight, ranks * slots, 1, 1, ranks)  # [L, S]
        table = phy2log.numpy().reshape(layers, ranks, slots)
        srt = np.sort(table, axis=-1)
        with_duplicates += bool((srt[..., 1:] == srt[..., :-1]).any())
        load = expert_to_slot_load(np.clip(table, 0, None), weight.double().numpy())
        for name in available_policies():
            new = create_policy(name).rebalance_experts(table, load).new_table
            validate_table(new, experts)
    print(f"{with_duplicates} of 60 maps from vLLM's policy hold an expert twice on a rank")
    assert with_duplicates >= 10  # the case this test is about does occur
