"""Bad files and careless paths (issue 15, "Files" and "Config"): every problem is an
error that names the file or key, never a raw OverflowError, RecursionError,
UnicodeDecodeError or MemoryError; a write never turns a device, FIFO or link into a
regular file, nor widens an existing file's mode."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import config_errors_as_nobody

from vllm_eplb_plugin.config import EplbConfig, EplbConfigError
from vllm_eplb_plugin.placement import (
    MAX_MAP_BYTES,
    InvalidExpertTable,
    default_table,
    load_expert_map,
    save_expert_map,
    table_to_json,
)

MAP = str(Path(__file__).parent.parent / "configs" / "expert_map_8e_2r.json")


def _map_text(expert: str = "0") -> str:
    doc = table_to_json(default_table(1, 2, 4, 8))
    text = json.dumps(doc)
    return text.replace('"device_expert": [0,', f'"device_expert": [{expert},', 1)


@pytest.mark.parametrize(
    "content, message",
    [
        (_map_text("1" + "0" * 30), "device_expert holds 1000000000000000000000000000000, which is no expert id"),
        (_map_text("1" * 5000), "is not valid JSON: Exceeds the limit"),
        ("[" * 100_000 + "]" * 100_000, "is nested too deeply to be an expert map"),
        (json.dumps(table_to_json(default_table(1, 2, 4, 8))).encode("utf-16"), "is not UTF-8 text"),
        (bytes(range(256)) * 4, "is not UTF-8 text"),
        ("{", "is not valid JSON"),
    ],
    ids=["id-1e30", "5000-digit-int", "deep-json", "utf-16", "binary", "truncated"],
)
def test_a_bad_map_file_is_an_invalid_table_naming_the_file(tmp_path, content, message):
    path = tmp_path / "map.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InvalidExpertTable) as err:
        load_expert_map(path)
    assert f"{str(path)!r}" in str(err.value) and message in str(err.value), str(err.value)
    with pytest.raises(EplbConfigError, match=r"eplb\.expert_map_path: "):  # and at start-up, under its key
        EplbConfig.from_dict({"expert_map_path": str(path)})


def test_a_huge_or_missing_map_file_is_refused_without_reading_it_all(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(MAX_MAP_BYTES + 10)  # sparse: no disk used
    with pytest.raises(InvalidExpertTable, match=r"is larger than 64 MiB; it is not an expert map"):
        load_expert_map(big)
    with pytest.raises(InvalidExpertTable, match=r"cannot read expert map .*No such file"):
        load_expert_map(tmp_path / "absent.json")


def test_saving_refuses_fifos_links_and_directories_and_leaves_them_as_they_were(tmp_path):
    table = default_table(1, 2, 4, 8)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    target = tmp_path / "real.json"
    save_expert_map(target, table)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    folder = tmp_path / "dir.json"
    folder.mkdir()
    for path, message in [(fifo, "exists and is not a regular file"), (link, "is a symbolic link"),
                          (folder, "exists and is not a regular file")]:
        with pytest.raises(ValueError, match=message):
            save_expert_map(path, table)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(link) and folder.is_dir()
    # no temp left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "fifo.json", "link.json", "real.json"]
    with pytest.raises(ValueError, match="contains a NUL byte"):
        save_expert_map(str(tmp_path / "a\x00.json"), table)


def test_saving_keeps_an_existing_files_mode(tmp_path):
    path = tmp_path / "private.json"
    path.write_text("{}")
    os.chmod(path, 0o600)
    save_expert_map(path, default_table(1, 2, 4, 8))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    np.testing.assert_array_equal(load_expert_map(path), default_table(1, 2, 4, 8))


def test_cli_plan_to_a_fifo_is_a_one_line_error(tmp_path):
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    heat = tmp_path / "heat.json"
    heat.write_text(json.dumps(np.ones((2, 8)).tolist()))
    proc = subprocess.run([sys.executable, "-m", "vllm_eplb_plugin.cli", "plan", "--heat", str(heat), "--ranks", "2",
                           "--redundant", "2", "-o", str(fifo)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "exists and is not a regular file" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"heat_ema_decay": 10**400}, r"eplb.heat_ema_decay must be a number strictly between 0.0 and 1.0; got 1000"),
        ({"plan_timeout_s": -(10**400)}, r"eplb.plan_timeout_s must be a number strictly between"),
        ({"policy": "swift", "policy_options": {"min_gain": 10**400}},
         r"eplb.policy_options: policy 'swift' option 'min_gain' must be in"),
        ({"policy": "flaky_policies:BrokenInitPolicy"},
         r"eplb.policy = 'flaky_policies:BrokenInitPolicy': building the policy raised "
         r"RuntimeError: no GPU for this policy"),
        ({"policy": "flaky_policies:AbstractPolicy"},
         r"eplb.policy = 'flaky_policies:AbstractPolicy': "
         r"policy 'flaky_policies:AbstractPolicy' is abstract: implement place"),
        ({"expert_map_record_path": "/tmp/a\x00b.json"}, r"eplb.expert_map_record_path contains a NUL byte"),
        ({"expert_map_path": "/tmp/a\x00b.json"}, r"eplb.expert_map_path contains a NUL byte"),
    ],
    ids=["401-digit-float-key", "401-digit-negative", "401-digit-option", "init-raises", "abstract", "nul-record",
         "nul-map"],
)
def test_careless_config_values_are_config_errors(monkeypatch, section, message):
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "helpers"))
    with pytest.raises(EplbConfigError, match=message):
        EplbConfig.from_dict(section)


def test_a_map_in_a_directory_the_user_cannot_enter_is_not_called_missing(shared_dir):
    closed = os.path.join(shared_dir, "closed")
    os.mkdir(closed)
    shutil.copy(MAP, os.path.join(closed, "map.json"))
    os.chmod(closed, 0o700)  # the owner (root) only
    out = config_errors_as_nobody(shared_dir, expert_map_path=os.path.join(closed, "map.json"))
    assert "cannot reach" in out and "check the permissions of its directories" in out, out
    assert "does not exist" not in out
