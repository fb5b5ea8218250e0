"""The conformance suite: every installed policy passes; broken policies fail with a
report that names the property and shows a minimal example."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from vllm_eplb_plugin import EplbPolicy, PlacementPolicy, PolicyResult, available_policies
from vllm_eplb_plugin.conformance import run_conformance
from vllm_eplb_plugin.policies.optimal import OptimalPolicy


@pytest.mark.parametrize("name", sorted(available_policies()))
def test_every_installed_policy_passes(name):
    report = run_conformance(name, examples=int(os.environ.get("EPLB_CONFORMANCE_EXAMPLES", "500")))
    assert report.ok, report.format()


class OptimalPairing(OptimalPolicy):
    """``optimal`` with its non-default option on: the pairing counts path."""

    name = "optimal-pairing"
    OPTIONS = {**OptimalPolicy.OPTIONS, "pairing": replace(OptimalPolicy.OPTIONS["pairing"], default=True)}


def test_optimal_with_pairing_passes():
    report = run_conformance(OptimalPairing, examples=int(os.environ.get("EPLB_CONFORMANCE_EXAMPLES", "500")))
    assert report.ok, report.format()


class DuplicatesExperts(PlacementPolicy):
    name = "dup"

    def place(self, table, series, expert_load):
        out = table.copy()
        if out.shape[2] > 1:
            out[:, :, 1] = out[:, :, 0]
        return out


class MutatesInput(EplbPolicy):
    def rebalance_experts(self, current_expert_table, expert_workload):
        current_expert_table[...] = current_expert_table[:, ::-1]
        return PolicyResult(True, np.arange(current_expert_table.shape[0]), current_expert_table.copy())


class IgnoresMaxMove(PlacementPolicy):
    name = "ignores-max-move"

    def place(self, table, series, expert_load):
        return table[:, ::-1].copy()

    def rebalance_experts(self, current_expert_table, expert_workload):
        # Bypass the template's bound on purpose.
        t = np.asarray(current_expert_table)
        new = t[:, ::-1].copy()
        return PolicyResult(bool(np.any(new != t)), np.arange(t.shape[0]), new)


class NonDeterministic(PlacementPolicy):
    calls = 0

    def place(self, table, series, expert_load):
        NonDeterministic.calls += 1
        return table[:, np.roll(np.arange(table.shape[1]), NonDeterministic.calls)].copy()


class WrongResultType(EplbPolicy):
    def rebalance_experts(self, current_expert_table, expert_workload):
        return 1, list(range(np.shape(current_expert_table)[0])), np.asarray(current_expert_table).tolist()


class MovesWithinRank(EplbPolicy):
    def rebalance_experts(self, current_expert_table, expert_workload):
        t = np.asarray(current_expert_table)
        new = t[..., ::-1].copy()  # every rank keeps its experts, in other slots
        return PolicyResult(bool(np.any(new != t)), np.arange(t.shape[0]), new)


class Slow(PlacementPolicy):
    def place(self, table, series, expert_load):
        import time

        time.sleep(0.05)
        return table.copy()


@pytest.mark.parametrize(
    "policy, prop, message",
    [
        (DuplicatesExperts, "valid_table", "layer 0 has no slot for logical expert 1"),
        (MutatesInput, "inputs_unchanged", "current_expert_table was modified"),
        (IgnoresMaxMove, "max_move", "max_move=0 but layers moved [2] slots"),
        (NonDeterministic, "deterministic", "returned different tables"),
        (WrongResultType, "result_contract", "returned tuple, not PolicyResult"),
        (MovesWithinRank, "experts_keep_their_slots", "keeps an expert but moves it to another slot"),
    ],
)
def test_broken_policy_fails_with_a_useful_report(policy, prop, message):
    report = run_conformance(policy, examples=60)
    assert not report.ok
    failed = {f.prop: f for f in report.failures}
    assert prop in failed, report.format()
    assert message in failed[prop].error, report.format()
    text = report.format()
    assert f"FAIL  {prop}:" in text and "minimal example: Case(L=1" in text


def test_time_budget_is_enforced():
    report = run_conformance(Slow, examples=2, time_budget=0.01, properties=["valid_table"])
    assert "over the 0.01 s budget" in report.failures[0].error


def test_cli_conformance_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "vllm_eplb_plugin.cli", "conformance", "random", "--examples", "20"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "8 passed, 0 failed" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, "-m", "vllm_eplb_plugin.cli", "conformance",
                          "test_conformance:DuplicatesExperts", "--examples", "20"],
                         capture_output=True, text=True, cwd=os.path.dirname(__file__),
                         env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)})
    assert bad.returncode == 1 and "FAIL  valid_table" in bad.stdout, bad.stdout + bad.stderr


def test_pytest_pyargs_entry(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "vllm_eplb_plugin.conformance",
                           "--eplb-policy", "example-lpt", "--eplb-examples", "20", "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "8 passed" in proc.stdout, proc.stdout + proc.stderr
