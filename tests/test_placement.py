"""The placement model: validator, derived maps, load conversion, expert-map files."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
from conftest import require, vllm_ascend_sdist

from vllm_eplb_plugin.placement import (
    InvalidExpertTable,
    default_table,
    expert_maps,
    expert_to_slot_load,
    load_expert_map,
    log2phy,
    logcnt,
    phy2log,
    rank_load,
    save_expert_map,
    slot_to_expert_load,
    table_from_json,
    table_to_json,
    validate_table,
)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")

# 1 layer, 2 ranks x 3 slots, 4 experts: expert 0 and 2 are replicated.
T = np.array([[[0, 1, 2], [3, 0, 2]]])


def test_derived_maps_hand_checked():
    assert phy2log(T).tolist() == [[0, 1, 2, 3, 0, 2]]
    assert logcnt(T, 4).tolist() == [[2, 1, 2, 1]]
    assert log2phy(T, 4).tolist() == [[[0, 4], [1, -1], [2, 5], [3, -1]]]
    assert expert_maps(T, 4).tolist() == [[[0, 1, 2, -1], [1, -1, 2, 0]]]


def test_log2phy_inverts_phy2log_on_random_tables():
    rng = np.random.default_rng(1)
    for _ in range(20):
        L, R, K = rng.integers(1, 5, 3)
        E = int(rng.integers(K, R * K + 1))
        t = default_table(L, R, K, E)
        t = np.take_along_axis(
            rng.permuted(np.tile(np.arange(E), (L, 1)), axis=1), t.reshape(L, -1), 1
        ).reshape(t.shape)
        p2l, l2p = phy2log(t), log2phy(t, E)
        for l in range(L):
            for e in range(E):
                slots = [p for p in l2p[l, e] if p >= 0]
                assert sorted(slots) == np.flatnonzero(p2l[l] == e).tolist()


def test_load_conversion_round_trip():
    w = np.array([[10.0, 3.0, 8.0, 5.0]])
    per_slot = expert_to_slot_load(T, w)
    assert per_slot.tolist() == [[[5.0, 3.0, 4.0], [5.0, 5.0, 4.0]]]
    assert rank_load(T, w).tolist() == [[12.0, 14.0]]
    assert slot_to_expert_load(T, per_slot, 4).tolist() == w.tolist()
    series = np.stack([per_slot, 2 * per_slot])  # [T=2, L, R, K]
    assert slot_to_expert_load(T, series, 4).tolist() == [w.tolist(), (2 * w).tolist()]
    assert np.array_equal(expert_to_slot_load(T, np.stack([w, 2 * w])), series)  # [T, L, E] -> [T, L, R, K]


def test_default_table_is_vllm_initial_placement():
    t = default_table(2, 3, 3, 7)
    assert t[0].tolist() == [[0, 1, 2], [3, 4, 5], [6, 0, 1]]
    assert np.array_equal(t[0], t[1])
    validate_table(t, 7)
    with pytest.raises(ValueError, match="cannot place 9 experts on 2 ranks x 4 slots"):
        default_table(1, 2, 4, 9)


@pytest.mark.parametrize(
    "table, num_experts, message",
    [
        ([[0, 1], [2, 3]], None, r"shape \[layers, ranks, slots_per_rank\] \(3 dims\); got shape \(2, 2\)"),
        (np.zeros((1, 0, 2), dtype=int), None, r"empty dimension: shape \(1, 0, 2\)"),
        ([[[0, 1.5], [2, 3]]], None, "integer expert ids; got non-integer floats"),
        ([[["a", "b"]]], None, "integer expert ids; got dtype <U1"),
        ([[[0, 1], [2, 4]]], 4, r"layer 0, rank 1, slot 1 holds expert 4, outside \[0, 4\)"),
        ([[[0, -1], [2, 3]]], None, r"layer 0, rank 0, slot 1 holds expert -1, outside \[0, 4\)"),
        ([[[0, 1], [2, 3]], [[0, 1], [1, 3]]], None, "layer 1 has no slot for logical expert 2"),
        ([[[0, 1], [2, 3]]], 5, "2 ranks x 2 slots = 4 slots cannot hold 5 experts"),
        ([[[0, 1, 2], [3, 3, 1]]], None, r"layer 0, rank 1 holds logical expert 3 twice \(slots \[0, 1\]\)"),
    ],
)
def test_validator_names_the_problem(table, num_experts, message):
    with pytest.raises(InvalidExpertTable, match=message):
        validate_table(np.asarray(table), num_experts)


def test_validator_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    assert validate_table(torch.tensor(T, dtype=torch.int32)).dtype == np.int64


def test_bundled_map_round_trip(tmp_path):
    table = load_expert_map(os.path.join(CONFIGS, "expert_map_8e_2r.json"))
    assert table.shape == (1, 2, 5)
    out = tmp_path / "map.json"
    save_expert_map(out, table)
    assert np.array_equal(load_expert_map(out), table)


def test_round_trip_with_vllm_ascend_example(tmp_path):
    sdist = vllm_ascend_sdist()
    require(sdist is not None, "vLLM Ascend's source tarball (VLLM_ASCEND_SDIST)")
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("tests/ut/eplb/core/a2/expert_map.json"))
        doc = json.load(tar.extractfile(member))
    table = table_from_json(doc)
    assert table.shape == (1, 2, 5)  # 8 logical experts, 2 ranks, 5 slots each
    assert sorted(set(table.ravel().tolist())) == list(range(8))
    out = tmp_path / "again.json"
    save_expert_map(out, table)
    assert json.loads(out.read_text()) == doc  # same document, key for key


def test_save_is_atomic_and_validates(tmp_path):
    out = tmp_path / "map.json"
    save_expert_map(out, T)
    before = out.read_text()
    with pytest.raises(InvalidExpertTable, match="holds logical expert 0 twice"):
        save_expert_map(out, [[[0, 0, 2], [3, 1, 2]]])
    assert out.read_text() == before  # an invalid table never replaces a good file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.json"]  # no temp file left


@pytest.mark.parametrize(
    "doc, message",
    [
        ([], "missing key 'moe_layer_count'"),
        ({"moe_layer_count": "1", "layer_list": []}, "moe_layer_count must be an integer"),
        ({"moe_layer_count": 2, "layer_list": []}, "moe_layer_count is 2 but layer_list has 0 entries"),
        ({"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_count": 2,
                                                "device_list": [{"device_id": 0, "device_expert": [0, 1]}]}]},
         "device_count is 2 but device_list has 1 entries"),
        ({"moe_layer_count": 1, "layer_list": [{"layer_id": 3, "device_count": 1,
                                                "device_list": [{"device_id": 0, "device_expert": [0, 1]}]}]},
         r"layer ids must be 0..0; got \[3\]"),
        ({"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_count": 2, "device_list": [
            {"device_id": 0, "device_expert": [0, 1]}, {"device_id": 0, "device_expert": [2, 3]}]}]},
         "device_id 0 appears twice"),
        ({"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_count": 2, "device_list": [
            {"device_id": 0, "device_expert": [0, 1]}, {"device_id": 1, "device_expert": [2]}]}]},
         "every device the same number of experts"),
        ({"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_count": 1, "device_list": [
            {"device_id": 0, "device_expert": [0, "1"]}]}]}, "device_expert must be a list of integers"),
    ],
)
def test_bad_expert_map_documents(doc, message):
    with pytest.raises(InvalidExpertTable, match=message):
        table_from_json(doc)


def test_load_expert_map_bad_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidExpertTable, match="is not valid JSON"):
        load_expert_map(bad)


def test_table_to_json_matches_format():
    doc = table_to_json(T)
    assert doc == {"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_count": 2, "device_list": [
        {"device_id": 0, "device_expert": [0, 1, 2]}, {"device_id": 1, "device_expert": [3, 0, 2]}]}]}
