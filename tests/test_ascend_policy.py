"""Our policies through vLLM Ascend's own policy contract (its policy_abstract.py and
expert-map example, read from its source tarball at test time; no NPU needed: the
contract is plain Python)."""

import json
import tarfile
import types

import numpy as np
import pytest

from conftest import require, vllm_ascend_sdist
from vllm_eplb_plugin.config import EplbConfig
from vllm_eplb_plugin.engine.ascend_policy import ascend_policy_class
from vllm_eplb_plugin.placement import expert_to_slot_load, table_from_json, validate_table


def _read(sdist: str, suffix: str) -> str:
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
        return tar.extractfile(member).read().decode()


@pytest.fixture(scope="module")
def ascend():
    sdist = vllm_ascend_sdist()
    require(sdist is not None, "vLLM Ascend's source tarball (.cache/peers)")
    module = types.ModuleType("policy_abstract")
    exec(compile(_read(sdist, "vllm_ascend/eplb/core/policy/policy_abstract.py"), "policy_abstract.py", "exec"), module.__dict__)
    table = table_from_json(json.loads(_read(sdist, "tests/ut/eplb/core/a2/expert_map.json")))
    return module.EplbPolicy, table


@pytest.mark.parametrize("policy", ["deepseek", "random", "example-lpt"])
def test_adapter_is_an_ascend_policy_and_plans_their_example_map(ascend, policy):
    base, table = ascend
    cls = ascend_policy_class(EplbConfig(policy=policy), base=base)
    instance = cls()  # what vLLM Ascend's PolicyFactory does
    assert isinstance(instance, base)
    experts = int(table.max()) + 1
    heat = np.random.default_rng(0).zipf(1.3, size=(table.shape[0], experts)).astype(float)
    changed, priority, new_table = instance.rebalance_experts(table, expert_to_slot_load(table, heat))
    # vLLM Ascend's worker unpacks exactly these three and uses new_table as [L, R, K].
    assert new_table.shape == table.shape and sorted(np.asarray(priority).tolist()) == list(range(table.shape[0]))
    validate_table(new_table, experts)
    assert bool(changed) == bool((new_table != table).any())
