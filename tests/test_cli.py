"""vllm-eplb plan / inspect on the bundled example, and their errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vllm_eplb_plugin.cli import main
from vllm_eplb_plugin.metrics import imbalance
from vllm_eplb_plugin.placement import load_expert_map

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
HEAT = os.path.join(CONFIGS, "example_heat.json")


def test_plan_then_inspect(tmp_path, capsys):
    out = tmp_path / "map.json"
    assert main(["plan", "--heat", HEAT, "--ranks", "6", "--redundant", "2", "-o", str(out)]) == 0
    table = load_expert_map(out)
    assert table.shape == (4, 6, 3)
    heat = np.array(json.load(open(HEAT))["heat"], dtype=float)
    assert np.all(imbalance(table, heat) < 1.2)
    printed = capsys.readouterr().out
    assert "policy swift: 4 layers, 6 ranks x 3 slots, 16 experts + 2 redundant" in printed
    assert main(["inspect", str(out), "--heat", HEAT]) == 0
    assert "4 layers, 6 ranks x 3 slots = 18 slots, 16 experts, 2 redundant" in capsys.readouterr().out


def test_plan_time_series_npy_and_current_map(tmp_path):
    rng = np.random.default_rng(0)
    heat = rng.integers(0, 100, (5, 1, 8)).astype(float)  # [T, L, E]
    np.save(tmp_path / "heat.npy", heat)
    out = tmp_path / "map.json"
    args = ["plan", "--heat", str(tmp_path / "heat.npy"), "--ranks", "2", "--redundant", "2",
            "--current", os.path.join(CONFIGS, "expert_map_8e_2r.json"), "--max-move", "1", "-o", str(out)]
    assert main(args) == 0
    old = load_expert_map(os.path.join(CONFIGS, "expert_map_8e_2r.json"))
    assert (load_expert_map(out) != old).sum() <= 1


def test_plan_errors(tmp_path, capsys):
    bad = tmp_path / "heat.json"
    bad.write_text(json.dumps([[1, -2]]))
    assert main(["plan", "--heat", str(bad), "--ranks", "2", "-o", str(tmp_path / "m.json")]) == 2
    assert "holds negative, NaN or infinite values" in capsys.readouterr().err
    assert main(["plan", "--heat", HEAT, "--ranks", "5", "--redundant", "2", "-o", str(tmp_path / "m.json")]) == 2
    assert ("16 experts + 2 redundant = 18 slots do not split evenly over 5 ranks; use --redundant 4"
            in capsys.readouterr().err)
    assert main(["plan", "--heat", HEAT, "--ranks", "6", "--redundant", "2", "--policy", "nope",
                 "-o", str(tmp_path / "m.json")]) == 2
    assert "no EPLB policy named 'nope'" in capsys.readouterr().err
    assert main(["inspect", os.path.join(CONFIGS, "expert_map_8e_2r.json"), "--heat", HEAT]) == 2
    assert "heat has shape [4, 16]; this map needs [1, 8]" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def _plan(tmp_path, heat, *extra):
    return main(["plan", "--heat", str(heat), "--ranks", "2", "--redundant", "2", *extra,
                 "-o", str(tmp_path / "m.json")])


def test_bad_plan_inputs_are_one_line_errors_with_exit_2(tmp_path, capsys):
    npz = tmp_path / "archive.npy"
    with open(npz, "wb") as f:
        np.savez(f, heat=np.ones((1, 8)))
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    claims = tmp_path / "claims.npy"  # a header promising 10**12 float64s, and no data
    with open(claims, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
    device = tmp_path / "random.json"
    device.symlink_to("/dev/urandom")
    for heat, message in [(npz, "is a .npz archive, not one array; save it with numpy.save"),
                          (empty, "cannot read heat file"), (claims, "cannot read heat file"),
                          (device, "is not a regular file")]:
        assert _plan(tmp_path, heat) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for flag, value in [("--ranks", "0"), ("--redundant", "-1"), ("--nodes", "x")]:
        args = ["plan", "--heat", HEAT, "--ranks", "6", "--redundant", "2", flag, value, "-o", str(tmp_path / "m.json")]
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_a_policy_that_raises_is_reported_as_a_policy_bug(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "helpers"))
    code = main(["plan", "--heat", HEAT, "--ranks", "6", "--redundant", "2", "--policy", "flaky_policies:RaisingPolicy",
                 "-o", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and 'raise RuntimeError("boom from RaisingPolicy")' in err, err
    assert err.strip().endswith(
        "policy 'raising' raised RuntimeError: boom from RaisingPolicy (a bug in the policy, not in the input)"
    )


@pytest.mark.parametrize("value, message", [("x", "'x' is not a number"),
                                            ("0", "0.0 is not a positive number of seconds"),
                                            ("inf", "inf is not a positive number of seconds")])
def test_conformance_case_timeout_must_be_positive_seconds(value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["conformance", "random", "--case-timeout", value])
    assert exit_.value.code == 2 and f"argument --case-timeout: {message}" in capsys.readouterr().err


def test_conformance_runs_the_policy_in_a_child_process(capsys, monkeypatch):
    """A policy that calls os._exit(0) would end this very process with status 0."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "helpers"))
    assert main(["conformance", "flaky_policies:OsExitZeroPolicy", "--examples", "2"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  result_contract: the policy's process exited with code 0" in out, out
