"""The placement model: which logical expert lives in which slot of which rank.

Shapes used throughout (numpy, ``int64`` ids, ``float64`` loads):

- ``L``  MoE layers, ``R`` expert-parallel ranks, ``K`` slots per rank,
  ``S = R * K`` physical slots, ``E`` logical experts (``S - E`` redundant slots).
- ``table [L, R, K]``: logical expert held by slot ``k`` of rank ``r`` in layer ``l``.
  The physical expert id of that slot is ``r * K + k``.
- ``phy2log [L, S]``, ``logcnt [L, E]``, ``log2phy [L, E, X]`` (-1 padded, ``X`` the
  largest replica count), ``expert_maps [L, R, E]`` (local slot of an expert on a rank,
  or -1; ``expert_maps[:, r]`` is rank ``r``'s ``expert_map [L, E]``).
- Loads: per slot ``[L, R, K]`` (what a rank measures), per slot over time
  ``[T, L, R, K]``, or per logical expert ``[L, E]``.

The expert-map file format is vLLM Ascend's, so maps move between the two projects.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import Any

import numpy as np

__all__ = [
    "InvalidExpertTable",
    "as_table",
    "validate_table",
    "num_experts_of",
    "default_table",
    "phy2log",
    "logcnt",
    "log2phy",
    "expert_maps",
    "slot_to_expert_load",
    "expert_to_slot_load",
    "rank_load",
    "changed_slots",
    "load_expert_map",
    "save_expert_map",
    "table_to_json",
    "table_from_json",
]


class InvalidExpertTable(ValueError):
    """An expert table breaks an invariant; the message says where and how."""


def _to_numpy(array: Any) -> np.ndarray:
    """numpy view of a numpy array, torch tensor (any device) or nested list."""
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def as_table(table: Any, *, name: str = "expert table") -> np.ndarray:
    """Convert ``table [L, R, K]`` (numpy, torch or lists) to ``int64`` without validating
    the placement invariants; the shape and integer-ness are checked."""
    arr = _to_numpy(table)
    if arr.ndim != 3:
        raise InvalidExpertTable(
            f"{name} must have shape [layers, ranks, slots_per_rank] (3 dims); got shape "
            f"{tuple(arr.shape)}. Pass one row of logical expert ids per rank per layer."
        )
    if 0 in arr.shape:
        raise InvalidExpertTable(f"{name} has an empty dimension: shape {tuple(arr.shape)}.")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InvalidExpertTable(f"{name} must hold integer expert ids; got non-integer floats.")
    elif arr.dtype.kind not in "iu":
        raise InvalidExpertTable(f"{name} must hold integer expert ids; got dtype {arr.dtype}.")
    return arr.astype(np.int64, copy=True)


def num_experts_of(table: np.ndarray) -> int:
    """Number of logical experts ``E`` a table describes (largest id + 1)."""
    return int(table.max()) + 1


def validate_table(table: Any, num_experts: int | None = None, *, name: str = "expert table") -> np.ndarray:
    """Check every placement invariant and return ``table [L, R, K]`` as ``int64``.

    Invariants: ids lie in ``[0, E)``; every logical expert has a slot in every layer; no
    rank holds one logical expert twice. ``E`` defaults to ``max id + 1``. Errors name the
    first offending layer, rank and slot.
    """
    t = as_table(table, name=name)
    L, R, K = t.shape
    E = num_experts_of(t) if num_experts is None else int(num_experts)
    bad = np.argwhere((t < 0) | (t >= E))
    if bad.size:
        l, r, k = bad[0]
        raise InvalidExpertTable(
            f"{name}: layer {l}, rank {r}, slot {k} holds expert {t[l, r, k]}, outside [0, {E}) "
            f"({len(bad)} such slots)."
        )
    if R * K < E:
        raise InvalidExpertTable(f"{name}: {R} ranks x {K} slots = {R * K} slots cannot hold {E} experts.")
    counts = logcnt(t, E)
    missing = np.argwhere(counts == 0)
    if missing.size:
        l, e = missing[0]
        raise InvalidExpertTable(
            f"{name}: layer {l} has no slot for logical expert {e} ({len(missing)} (layer, expert) "
            f"pairs missing); every expert must be placed at least once in every layer."
        )
    srt = np.sort(t, axis=-1)
    dup = np.argwhere(srt[..., 1:] == srt[..., :-1])
    if dup.size:
        l, r, j = dup[0]
        e = srt[l, r, j]
        slots = np.flatnonzero(t[l, r] == e).tolist()
        raise InvalidExpertTable(
            f"{name}: layer {l}, rank {r} holds logical expert {e} twice (slots {slots}); a rank "
            f"may hold each expert at most once."
        )
    return t


def default_table(num_layers: int, num_ranks: int, slots_per_rank: int, num_experts: int) -> np.ndarray:
    """vLLM's initial placement: physical slot ``p`` holds expert ``p % E``.

    Returns ``table [L, R, K]``. Needs ``E <= R * K`` and ``K <= E`` (no rank holds an
    expert twice).
    """
    S = num_ranks * slots_per_rank
    if not 1 <= slots_per_rank <= num_experts <= S:
        raise ValueError(
            f"cannot place {num_experts} experts on {num_ranks} ranks x {slots_per_rank} slots: "
            f"need slots_per_rank <= experts <= ranks * slots_per_rank."
        )
    row = np.arange(S, dtype=np.int64) % num_experts
    return np.broadcast_to(row.reshape(1, num_ranks, slots_per_rank), (num_layers, num_ranks, slots_per_rank)).copy()


def phy2log(table: np.ndarray) -> np.ndarray:
    """``table [L, R, K]`` -> ``phy2log [L, S]`` (physical slot ``r * K + k``)."""
    return table.reshape(table.shape[0], -1)


def logcnt(table: np.ndarray, num_experts: int) -> np.ndarray:
    """``table [L, R, K]`` -> replica count per logical expert ``[L, E]``."""
    L = table.shape[0]
    flat = (table.reshape(L, -1) + np.arange(L)[:, None] * num_experts).ravel()
    return np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)


def log2phy(table: np.ndarray, num_experts: int) -> np.ndarray:
    """``table [L, R, K]`` -> ``log2phy [L, E, X]``: physical slots of each expert in
    increasing order, padded with -1 to ``X = max replica count``."""
    p2l = phy2log(table)
    L, S = p2l.shape
    cnt = logcnt(table, num_experts)
    order = np.argsort(p2l, axis=1, kind="stable")  # physical ids grouped by expert
    start = np.cumsum(cnt, axis=1) - cnt  # [L, E] first position of each expert in `order`
    experts = np.take_along_axis(p2l, order, axis=1)
    replica = np.arange(S)[None, :] - np.take_along_axis(start, experts, axis=1)
    out = np.full((L, num_experts, int(cnt.max())), -1, dtype=np.int64)
    out[np.arange(L)[:, None], experts, replica] = order
    return out


def expert_maps(table: np.ndarray, num_experts: int) -> np.ndarray:
    """``table [L, R, K]`` -> ``[L, R, E]``: local slot of expert ``e`` on rank ``r``, or -1."""
    L, R, K = table.shape
    out = np.full((L, R, num_experts), -1, dtype=np.int64)
    li, ri, ki = np.indices((L, R, K))
    out[li, ri, table] = ki
    return out


def slot_to_expert_load(table: np.ndarray, slot_load: np.ndarray, num_experts: int) -> np.ndarray:
    """Sum per-slot loads by logical expert.

    ``slot_load [..., L, R, K]`` (any leading dims, e.g. time ``T``) -> ``[..., L, E]``.
    """
    L = table.shape[0]
    lead = slot_load.shape[:-3]
    n = int(np.prod(lead, dtype=np.int64))
    flat = slot_load.reshape(n, L, -1).astype(np.float64)
    key = (table.reshape(1, L, -1) + (np.arange(n * L) * num_experts).reshape(n, L, 1)).ravel()
    out = np.bincount(key, weights=flat.ravel(), minlength=n * L * num_experts)
    return out.reshape(*lead, L, num_experts)


def expert_to_slot_load(table: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
    """Spread per-expert load evenly over each expert's replicas (inverse of
    ``slot_to_expert_load``).

    ``expert_load [..., L, E]`` (any leading dims, e.g. time ``T``) -> ``[..., L, R, K]``.
    """
    L, E = expert_load.shape[-2:]
    per_replica = expert_load / np.maximum(logcnt(table, E), 1)
    slots = per_replica[..., np.arange(L)[:, None], table.reshape(L, -1)]  # [..., L, S]
    return slots.reshape(*expert_load.shape[:-2], *table.shape)


def rank_load(table: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
    """Load of each rank ``[L, R]`` when each expert's load ``[L, E]`` splits evenly
    over its replicas in ``table [L, R, K]``."""
    return expert_to_slot_load(table, expert_load).sum(axis=-1)


def changed_slots(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Number of slots per layer ``[L]`` whose expert differs between two tables."""
    return (old != new).reshape(old.shape[0], -1).sum(axis=1)


# --- expert-map files (vLLM Ascend format) --------------------------------------------


def table_to_json(table: np.ndarray) -> dict:
    """``table [L, R, K]`` -> vLLM Ascend's expert-map document."""
    L, R, _ = table.shape
    return {
        "moe_layer_count": int(L),
        "layer_list": [
            {
                "layer_id": int(l),
                "device_count": int(R),
                "device_list": [
                    {"device_id": int(r), "device_expert": [int(e) for e in table[l, r]]} for r in range(R)
                ],
            }
            for l in range(L)
        ],
    }


def _field(obj: Any, key: str, where: str, kind: type) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise InvalidExpertTable(f"{where}: missing key {key!r}.")
    value = obj[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidExpertTable(f"{where}.{key} must be an integer; got {value!r}.")
    if kind is list and not isinstance(value, list):
        raise InvalidExpertTable(f"{where}.{key} must be a list; got {type(value).__name__}.")
    return value


def table_from_json(doc: Any, *, source: str = "expert map") -> np.ndarray:
    """Parse and validate vLLM Ascend's expert-map document -> ``table [L, R, K]``.

    Layers are ordered by ``layer_id`` and ranks by ``device_id``; both must be exactly
    ``0..n-1``. Every rank must hold the same number of slots.
    """
    num_layers = _field(doc, "moe_layer_count", source, int)
    layers = _field(doc, "layer_list", source, list)
    if len(layers) != num_layers:
        raise InvalidExpertTable(f"{source}: moe_layer_count is {num_layers} but layer_list has {len(layers)} entries.")
    rows: dict[int, list[list[int]]] = {}
    for i, layer in enumerate(layers):
        where = f"{source}: layer_list[{i}]"
        lid = _field(layer, "layer_id", where, int)
        devices = _field(layer, "device_list", where, list)
        count = _field(layer, "device_count", where, int)
        if count != len(devices):
            raise InvalidExpertTable(f"{where}: device_count is {count} but device_list has {len(devices)} entries.")
        by_id: dict[int, list[int]] = {}
        for j, dev in enumerate(devices):
            dwhere = f"{where}.device_list[{j}]"
            did = _field(dev, "device_id", dwhere, int)
            experts = _field(dev, "device_expert", dwhere, list)
            if any(isinstance(e, bool) or not isinstance(e, int) for e in experts):
                raise InvalidExpertTable(f"{dwhere}.device_expert must be a list of integers; got {experts!r}.")
            huge = next((e for e in experts if not -(1 << 63) <= e < 1 << 63), None)
            if huge is not None:
                raise InvalidExpertTable(
                    f"{dwhere}.device_expert holds {huge}, which is no expert id (ids are 0..E-1)."
                )
            if did in by_id:
                raise InvalidExpertTable(f"{where}: device_id {did} appears twice.")
            by_id[did] = experts
        if sorted(by_id) != list(range(len(by_id))):
            raise InvalidExpertTable(f"{where}: device ids must be 0..{len(by_id) - 1}; got {sorted(by_id)}.")
        if lid in rows:
            raise InvalidExpertTable(f"{where}: layer_id {lid} appears twice.")
        rows[lid] = [by_id[d] for d in range(len(by_id))]
    if sorted(rows) != list(range(num_layers)):
        raise InvalidExpertTable(f"{source}: layer ids must be 0..{num_layers - 1}; got {sorted(rows)}.")
    shapes = {(len(r), len(r[0]) if r else 0) for r in rows.values()}
    widths = {len(dev) for r in rows.values() for dev in r}
    if len(shapes) != 1 or len(widths) != 1:
        raise InvalidExpertTable(
            f"{source}: every layer must have the same number of devices and every device the same "
            f"number of experts; got (devices, experts) {sorted(shapes)} and widths {sorted(widths)}."
        )
    return validate_table(np.array([rows[l] for l in range(num_layers)], dtype=np.int64), name=source)


MAX_MAP_BYTES = 64 << 20
"""An expert map larger than this is refused (DeepSeek-V3's is about 100 KiB)."""


def load_expert_map(path: str | os.PathLike) -> np.ndarray:
    """Read and validate an expert-map JSON file -> ``table [L, R, K]``.

    Every problem with the file (unreadable, not UTF-8, not JSON, nested or numbered
    beyond what JSON maps need, an invalid table) is an :class:`InvalidExpertTable` that
    names the file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MAP_BYTES + 1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise InvalidExpertTable(f"cannot read expert map {path!r}: {exc}.") from exc
    if len(data) > MAX_MAP_BYTES:
        raise InvalidExpertTable(
            f"expert map {path!r} is larger than {MAX_MAP_BYTES >> 20} MiB; it is not an expert map."
        )
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidExpertTable(f"expert map {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
    except RecursionError as exc:
        raise InvalidExpertTable(f"expert map {path!r} is nested too deeply to be an expert map.") from exc
    except ValueError as exc:  # JSONDecodeError, or an integer with thousands of digits
        raise InvalidExpertTable(f"expert map {path!r} is not valid JSON: {exc}.") from exc
    return table_from_json(doc, source=f"expert map {path!r}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _target_mode(path: str) -> int:
    """The mode the written map gets: an existing file's, else the usual one. Refuses a
    target that is not a regular file: renaming over a device, a FIFO or a symbolic link
    would replace it with a regular file."""
    if "\x00" in path:
        raise ValueError(f"expert map path {path!r} contains a NUL byte; give a file path.")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0o666 & ~_umask()
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"{path!r} is a symbolic link; write the expert map to the file it points to "
                         f"({os.path.realpath(path)!r}) or to a new path.")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path!r} exists and is not a regular file; write the expert map to a regular file path.")
    return stat.S_IMODE(st.st_mode)


def save_expert_map(path: str | os.PathLike, table: Any, *, extra: dict | None = None) -> None:
    """Validate ``table [L, R, K]`` and write it atomically (temp file + rename), so a
    reader never sees a half-written map.

    ``extra`` (JSON-serialisable) is stored under the top-level key ``"eplb"``: readers
    of the vLLM Ascend format, ours included, ignore keys they do not know. An existing
    file keeps its mode; a target that is not a regular file raises ``ValueError``.
    """
    t = validate_table(table)
    doc = table_to_json(t)
    if extra is not None:
        doc["eplb"] = extra
    path = os.fspath(path)
    mode = _target_mode(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".expert_map.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
