"""EplbConfig: good configs, vLLM Ascend aliases, and every bad input with its message."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import config_errors_as_nobody

from vllm_eplb_plugin.config import EplbConfig, EplbConfigError

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
MAP = os.path.join(CONFIGS, "expert_map_8e_2r.json")


def test_no_section_means_off():
    assert EplbConfig.from_additional_config(None) is None
    assert EplbConfig.from_additional_config({}) is None
    assert EplbConfig.from_additional_config({"ascend_scheduler_config": {}}) is None
    assert EplbConfig.from_additional_config({"eplb": None}) is None


def test_defaults_and_example_config():
    with open(os.path.join(CONFIGS, "eplb_additional_config.json")) as f:
        cfg = EplbConfig.from_additional_config(json.load(f))
    assert cfg.policy == "deepseek" and cfg.num_redundant_experts == 2
    empty = EplbConfig.from_additional_config({"eplb": {}})
    assert (empty.expert_heat_collection_interval, empty.algorithm_execution_interval) == (600, 50)
    assert json.loads(json.dumps(empty.to_dict())) == empty.to_dict()  # stays JSON-serialisable


def test_vllm_ascend_section_and_aliases():
    cfg = EplbConfig.from_additional_config({"eplb_config": {
        "dynamic_eplb": True, "eplb_policy_type": 0, "num_redundant_experts": 4,
        "eplb_heat_collection_stage": "decode", "expert_map_path": MAP}})
    assert (cfg.policy, cfg.heat_collection_stage, cfg.expert_map_path) == (0, "decode", MAP)
    assert cfg.policy_config().max_move is None


def test_vllm_ascend_old_flat_keys():
    cfg = EplbConfig.from_additional_config({
        "num_iterations_eplb_update": 100, "num_wait_worker_iterations": 7, "init_redundancy_expert": 2,
        "dynamic_eplb": True, "eplb_policy_type": 1, "torchair_graph_config": {}})
    assert (cfg.expert_heat_collection_interval, cfg.algorithm_execution_interval,
            cfg.num_redundant_experts, cfg.policy) == (100, 7, 2, 1)


def test_record_path_check_never_creates_or_truncates(tmp_path):
    record = tmp_path / "record.json"
    EplbConfig.from_dict({"expert_map_record_path": str(record)})
    assert not record.exists()
    record.write_text("keep me")
    EplbConfig.from_dict({"expert_map_record_path": str(record)})
    assert record.read_text() == "keep me"


def _bad_map(tmp_path, text):
    path = tmp_path / "bad_map.json"
    path.write_text(text)
    return str(path)


BAD = [
    # (additional_config or callable(tmp_path) -> additional_config, message regex)
    ({"eplb": []}, r"additional_config.eplb must be a JSON object of settings; got \[\]"),
    ({"eplb": {}, "eplb_config": {}}, "has both 'eplb' and 'eplb_config'"),
    ({"eplb": {}, "dynamic_eplb": True}, r"has the section 'eplb' and the flat key\(s\) \['dynamic_eplb'\]"),
    ({"eplb": {"polcy": "deepseek"}}, r"unknown key 'polcy'. Did you mean 'policy'\?"),
    ({"eplb": {"num_redundant_expert": 1}},
     r"unknown key 'num_redundant_expert'. Did you mean 'num_redundant_experts'\?"),
    ({"eplb": {"zzz": 1}}, r"unknown key 'zzz'. Valid keys: algorithm_execution_interval"),
    ({"eplb": {"policy": "x", "eplb_policy_type": 1}}, r"'policy' is given twice \(once as 'eplb_policy_type'\)"),
    ({"eplb": {"num_redundant_experts": -1}}, r"eplb.num_redundant_experts must be in \[0, 65536\]; got -1"),
    ({"eplb": {"num_redundant_experts": 70000}}, r"num_redundant_experts must be in \[0, 65536\]; got 70000"),
    ({"eplb": {"num_redundant_experts": "16"}},
     r"num_redundant_experts must be an integer in \[0, 65536\]; got '16' \(str\)"),
    ({"eplb": {"num_redundant_experts": 1.0}}, r"num_redundant_experts must be an integer .* got 1.0 \(float\)"),
    ({"eplb": {"num_redundant_experts": True}}, r"num_redundant_experts must be an integer .* got True \(bool\)"),
    ({"eplb": {"expert_heat_collection_interval": 0}},
     r"expert_heat_collection_interval must be in \[1, 10000000\]; got 0"),
    ({"eplb": {"expert_heat_collection_interval": 10**8}},
     r"expert_heat_collection_interval must be in \[1, 10000000\]; got 100000000"),
    ({"eplb": {"expert_heat_collection_interval": None}},
     r"expert_heat_collection_interval must be an integer .* got None"),
    ({"eplb": {"algorithm_execution_interval": 0}}, r"algorithm_execution_interval must be in \[1, 1000000\]; got 0"),
    ({"eplb": {"algorithm_execution_interval": -5}}, r"algorithm_execution_interval must be in \[1, 1000000\]; got -5"),
    ({"num_iterations_eplb_update": 0},
     r"additional_config.expert_heat_collection_interval must be in \[1, 10000000\]; got 0"),
    ({"num_wait_worker_iterations": 0},
     r"additional_config.algorithm_execution_interval must be in \[1, 1000000\]; got 0"),
    ({"init_redundancy_expert": -2}, r"additional_config.num_redundant_experts must be in \[0, 65536\]; got -2"),
    ({"eplb": {"num_nodes": 0}}, r"num_nodes must be in \[1, 65536\]; got 0"),
    ({"eplb": {"num_groups": 0}}, r"num_groups must be in \[1, 65536\]; got 0"),
    ({"eplb": {"num_groups": 2.5}}, r"num_groups must be an integer"),
    ({"eplb": {"max_move": -1}}, r"max_move must be in \[0, 1048576\]; got -1"),
    ({"eplb": {"max_move": "3"}}, r"max_move must be an integer"),
    ({"eplb": {"heat_window_steps": 0}}, r"heat_window_steps must be in \[1, 65536\]; got 0"),
    ({"eplb": {"dynamic_eplb": "true"}}, r"dynamic_eplb must be a JSON boolean \(true or false\); got 'true' \(str\)"),
    ({"eplb": {"dynamic_eplb": 1}}, r"dynamic_eplb must be a JSON boolean .* got 1 \(int\)"),
    ({"dynamic_eplb": "false"}, r"additional_config.dynamic_eplb must be a JSON boolean"),
    ({"eplb": {"heat_collection_stage": "prefil"}},
     r"heat_collection_stage must be one of \['all', 'prefill', 'decode'\]; got 'prefil'"),
    ({"eplb_config": {"eplb_heat_collection_stage": "both"}}, r"eplb_config.heat_collection_stage must be one of"),
    ({"eplb": {"heat_window": "mean"}}, r"heat_window must be one of \['sum', 'ema', 'steps'\]; got 'mean'"),
    ({"eplb": {"heat_ema_decay": 1.0}}, r"heat_ema_decay must be a number strictly between 0.0 and 1.0; got 1.0"),
    ({"eplb": {"heat_ema_decay": "0.5"}}, r"heat_ema_decay must be a number strictly between"),
    ({"eplb": {"heat_ema_decay": float("nan")}}, r"heat_ema_decay must be a number strictly between"),
    ({"eplb": {"policy": "deepsek"}},
     r"eplb.policy = 'deepsek': no EPLB policy named 'deepsek'. Did you mean 'deepseek'\?"),
    ({"eplb": {"policy": 9}}, r"eplb.policy = 9: eplb_policy_type 9 is not one of vLLM Ascend's types"),
    ({"eplb": {"policy": ["deepseek"]}},
     r"policy must be a policy name or an eplb_policy_type number \(0-3\); got \['deepseek'\]"),
    ({"eplb": {"policy": True}}, r"policy must be a policy name or an eplb_policy_type number"),
    ({"eplb": {"policy": "no_mod:Cls"}}, r"eplb.policy = 'no_mod:Cls': cannot import module 'no_mod'"),
    ({"eplb": {"policy_options": {"seed": 1}}},
     r"eplb.policy_options: policy 'swift' has no option 'seed'; its options are: min_gain, slack"),
    ({"eplb": {"policy": "random", "policy_options": {"seed": -1}}},
     r"policy 'random' option 'seed' must be in \[0, 4294967295\]; got -1"),
    ({"eplb": {"policy_options": [1]}}, r"policy_options must be a JSON object with string keys; got \[1\]"),
    ({"eplb": {"policy_options": {"a": {1, 2}}}}, r"policy_options must be JSON-serialisable"),
    ({"eplb": {"expert_map_path": 5}}, r"expert_map_path must be a string path to a .json file; got 5 \(int\)"),
    ({"eplb": {"expert_map_path": "  "}}, r"expert_map_path is an empty string"),
    ({"eplb": {"expert_map_path": "map.yaml"}}, r"expert_map_path must end in .json; got 'map.yaml'"),
    ({"eplb": {"expert_map_path": "/nonexistent/map.json"}},
     r"expert_map_path: '/nonexistent/map.json' does not exist"),
    (lambda p: {"eplb": {"expert_map_path": str(_dir_named_json(p))}}, r"expert_map_path: .* is not a regular file"),
    (lambda p: {"eplb": {"expert_map_path": _bad_map(p, "{oops")}},
     r"expert_map_path: expert map .* is not valid JSON"),
    (lambda p: {"eplb": {"expert_map_path": _bad_map(p, '{"moe_layer_count": 1, "layer_list": []}')}},
     r"expert_map_path: expert map .*: moe_layer_count is 1 but layer_list has 0 entries"),
    (lambda p: {"eplb": {"expert_map_path": _bad_map(p, json.dumps({"moe_layer_count": 1, "layer_list": [
        {"layer_id": 0, "device_count": 2, "device_list": [{"device_id": 0, "device_expert": [0, 0]},
                                                           {"device_id": 1, "device_expert": [1, 2]}]}]}))}},
     r"expert_map_path: expert map .*: layer 0, rank 0 holds logical expert 0 twice"),
    ({"eplb": {"expert_map_record_path": ""}}, r"expert_map_record_path is an empty string"),
    ({"eplb": {"expert_map_record_path": "out.txt"}}, r"expert_map_record_path must end in .json; got 'out.txt'"),
    ({"eplb": {"expert_map_record_path": "/nonexistent/dir/out.json"}},
     r"expert_map_record_path: directory '/nonexistent/dir' does not exist; create it first"),
    (lambda p: {"eplb": {"expert_map_record_path": str(_dir_named_json(p))}},
     r"expert_map_record_path: .* exists and is not a regular file"),
    ({"eplb": {"expert_map_record_path": ["a.json"]}}, r"expert_map_record_path must be a string path to a .json file"),
    ("not a dict", r"additional_config must be a JSON object; got str"),
]


def _dir_named_json(tmp_path):
    d = tmp_path / "looks_like.json"
    d.mkdir(exist_ok=True)
    return d


@pytest.mark.parametrize("config, message", BAD, ids=[f"bad{i:02d}" for i in range(len(BAD))])
def test_bad_config_names_key_value_and_fix(config, message, tmp_path):
    if callable(config):
        config = config(tmp_path)
    with pytest.raises(EplbConfigError, match=message):
        EplbConfig.from_additional_config(config)


def test_at_least_forty_bad_inputs():
    assert len(BAD) >= 40


def test_unreadable_and_unwritable_paths(shared_dir):
    locked = os.path.join(shared_dir, "locked.json")
    shutil.copy(MAP, locked)
    os.chmod(locked, 0)
    ro_dir = os.path.join(shared_dir, "ro")
    os.mkdir(ro_dir, 0o555)
    os.chmod(ro_dir, 0o555)
    out = config_errors_as_nobody(shared_dir, expert_map_path=locked,
                                  expert_map_record_path=os.path.join(ro_dir, "r.json"))
    assert "expert_map_path: cannot read" in out and "check its permissions" in out, out
    assert f"expert_map_record_path: directory '{ro_dir}' is not writable" in out, out


def test_on_vllm_ascend_only_the_eplb_section_turns_the_plugin_on():
    ascend_only = {"eplb_config": {"dynamic_eplb": True, "eplb_policy_type": 3}}
    assert EplbConfig.from_additional_config(ascend_only, ascend=True) is None  # vLLM Ascend's own EPLB
    both = {**ascend_only, "eplb": {"policy": "optimal", "plan_timeout_s": 5}}
    cfg = EplbConfig.from_additional_config(both, ascend=True)
    assert cfg.policy == "optimal" and cfg.plan_timeout_s == 5
    with pytest.raises(EplbConfigError, match="outside vLLM Ascend keep one"):
        EplbConfig.from_additional_config(both)


@pytest.mark.parametrize("value", [0, -1, 86400, "30", True, float("nan")])
def test_plan_timeout_must_be_a_positive_number_of_seconds(value):
    with pytest.raises(EplbConfigError, match=r"eplb.plan_timeout_s must be a number strictly between 0.0 and 86400.0"):
        EplbConfig.from_dict({"plan_timeout_s": value})
