"""The ``eplb`` section of vLLM's ``--additional-config``, validated in one place.

``EplbConfig.from_additional_config(additional_config)`` reads ``additional_config["eplb"]``,
or (outside vLLM Ascend, which owns them) vLLM Ascend's ``eplb_config`` section or its old
flat keys; returns None when none is present (the plugin stays off). Every error names the key, the bad value and what
is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import InitVar, dataclass, field
from typing import Any, Mapping

from .placement import InvalidExpertTable, load_expert_map
from .policy import PolicyConfig, is_number

__all__ = ["EplbConfig", "EplbConfigError", "SECTION", "ASCEND_SECTION"]

SECTION = "eplb"
ASCEND_SECTION = "eplb_config"

# vLLM Ascend's names (in its eplb_config section or flat in additional_config) -> ours.
_ALIASES = {
    "eplb_policy_type": "policy",
    "eplb_heat_collection_stage": "heat_collection_stage",
    "num_iterations_eplb_update": "expert_heat_collection_interval",
    "num_wait_worker_iterations": "algorithm_execution_interval",
    "init_redundancy_expert": "num_redundant_experts",
}
# Keys vLLM Ascend accepted flat in additional_config before it grew eplb_config.
_FLAT_KEYS = ("num_iterations_eplb_update", "num_wait_worker_iterations", "init_redundancy_expert",
              "dynamic_eplb", "expert_map_path", "expert_map_record_path", "eplb_policy_type")


class EplbConfigError(ValueError):
    """A bad EPLB config value; the message names the key and the fix."""


def _int(lo: int, hi: int, optional: bool = False) -> dict:
    return {"kind": "int", "min": lo, "max": hi, "optional": optional}


@dataclass(frozen=True)
class EplbConfig:
    """EPLB settings. Field docstrings are the user documentation."""

    policy: str | int | None = None
    """Policy name (see ``vllm-eplb policies``), ``"package.module:Class"``, or vLLM
    Ascend's ``eplb_policy_type`` 0-3. None: the default policy."""
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    """Knobs of the chosen policy (``vllm-eplb policies`` lists them)."""
    num_redundant_experts: int = field(default=0, metadata=_int(0, 65536))
    """Extra physical slots beyond the logical experts, for replicas of hot experts."""
    num_nodes: int = field(default=1, metadata=_int(1, 65536))
    """Server nodes the EP ranks span (hierarchical placement)."""
    num_groups: int = field(default=1, metadata=_int(1, 65536))
    """Expert groups of group-limited routing (DeepSeek-V3: 8)."""
    max_move: int | None = field(default=None, metadata=_int(0, 1 << 20, optional=True))
    """At most this many slots change per layer per update; None: unbounded."""
    dynamic_eplb: bool = True
    """Re-plan periodically while serving; False: only load ``expert_map_path``."""
    expert_heat_collection_interval: int = field(default=600, metadata=_int(1, 10_000_000))
    """Forward steps of heat collected between two plans."""
    algorithm_execution_interval: int = field(default=50, metadata=_int(1, 1_000_000))
    """Forward steps a plan may take off the forward path; past them the forward loop blocks
    on it (at most ``plan_timeout_s``), so a plan lands by this step however loaded the host."""
    heat_collection_stage: str = field(default="all", metadata={"choices": ("all", "prefill", "decode")})
    """Which steps count towards heat: all, prefill-only or decode-only."""
    heat_window: str = field(default="sum", metadata={"choices": ("sum", "ema", "steps")})
    """sum: total since the last plan; ema: exponential average per interval; steps: a
    per-step ring buffer (time-series policies)."""
    heat_ema_decay: float = field(default=0.5, metadata={"kind": "float", "min": 0.0, "max": 1.0})
    """Weight kept by the old average at each interval, for ``heat_window="ema"`` (0 < x < 1)."""
    heat_window_steps: int = field(default=64, metadata=_int(1, 65536))
    """Steps kept by the ring buffer of ``heat_window="steps"``."""
    plan_timeout_s: float = field(default=30.0, metadata={"kind": "float", "min": 0.0, "max": 86400.0})
    """Seconds one policy run may take before it is killed and the current table kept.
    The forward loop blocks on a plan once ``algorithm_execution_interval`` steps have
    passed (on vLLM and on vLLM Ascend), so this bounds that stall."""
    expert_map_path: str | None = None
    """Expert map (vLLM Ascend JSON) to start from; must exist and be valid."""
    expert_map_record_path: str | None = None
    """Where each new plan is written (atomically); its directory must exist."""
    where: InitVar[str] = SECTION
    """Key prefix used in error messages (not a setting)."""

    # --- construction -----------------------------------------------------------------

    @classmethod
    def from_additional_config(
        cls, additional_config: Mapping[str, Any] | None, *, ascend: bool = False
    ) -> "EplbConfig | None":
        """Build from vLLM's ``additional_config``; None when it has no EPLB settings.

        ``ascend``: running on vLLM Ascend, which owns its ``eplb_config`` section and flat
        keys. There only ``eplb`` turns the plugin on, beside ``eplb_config``; elsewhere
        ``eplb_config`` (or the flat keys) is read as the plugin's section.
        """
        if not additional_config:
            return None
        if not isinstance(additional_config, Mapping):
            raise EplbConfigError(f"additional_config must be a JSON object; got {type(additional_config).__name__}.")
        if ascend:
            section = additional_config.get(SECTION)
            return None if section is None else cls.from_dict(section, where=f"additional_config.{SECTION}")
        sections = [s for s in (SECTION, ASCEND_SECTION) if s in additional_config]
        flat = {k: additional_config[k] for k in _FLAT_KEYS if k in additional_config}
        if len(sections) == 2:
            raise EplbConfigError(
                f"additional_config has both {SECTION!r} and {ASCEND_SECTION!r}; outside vLLM Ascend keep one "
                f"({SECTION!r} is preferred)."
            )
        if sections and flat:
            raise EplbConfigError(
                f"additional_config has the section {sections[0]!r} and the flat key(s) {sorted(flat)}; "
                f"move them into {sections[0]!r}."
            )
        if sections:
            section = additional_config[sections[0]]
            if section is None:
                return None
            return cls.from_dict(section, where=f"additional_config.{sections[0]}")
        if flat:
            return cls.from_dict(flat, where="additional_config")
        return None

    @classmethod
    def from_dict(cls, values: Any, *, where: str = SECTION) -> "EplbConfig":
        """Build from one section's key/value pairs, accepting vLLM Ascend's key names."""
        if not isinstance(values, Mapping):
            raise EplbConfigError(f"{where} must be a JSON object of settings; got {values!r}.")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            canonical = _ALIASES.get(key, key)
            if canonical not in names:
                hint = difflib.get_close_matches(str(key), sorted(names | set(_ALIASES)), n=1, cutoff=0.6)
                suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
                raise EplbConfigError(
                    f"{where}: unknown key {key!r}.{suggestion} Valid keys: {', '.join(sorted(names))}."
                )
            if canonical in kwargs:
                raise EplbConfigError(f"{where}: {canonical!r} is given twice (once as {key!r}); keep one.")
            kwargs[canonical] = value
        return cls(**kwargs, where=where)

    def __post_init__(self, where: str) -> None:
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name), f"{where}.{f.name}")
        self._check_policy(where)
        if self.expert_map_path is not None:
            _check_expert_map_path(self.expert_map_path, f"{where}.expert_map_path")
        if self.expert_map_record_path is not None:
            _check_record_path(self.expert_map_record_path, f"{where}.expert_map_record_path")

    def _check_policy(self, where: str) -> None:
        from .registry import PolicyLoadError, PolicyNotFound, load_policy_class

        try:
            cls = load_policy_class(self.policy)
        except (PolicyNotFound, PolicyLoadError) as exc:
            raise EplbConfigError(f"{where}.policy = {self.policy!r}: {exc}") from exc
        try:
            cls.resolve_options(self.policy_config())
        except (TypeError, ValueError) as exc:
            raise EplbConfigError(f"{where}.policy_options: {exc}") from exc
        try:
            cls(self.policy_config())
        except Exception as exc:  # the policy's own bug, reported as one
            raise EplbConfigError(
                f"{where}.policy = {self.policy!r}: building the policy raised {type(exc).__name__}: {exc}; "
                "fix the policy or choose another."
            ) from exc

    # --- views ------------------------------------------------------------------------

    def policy_config(self) -> PolicyConfig:
        """The ``PolicyConfig`` this config asks for."""
        return PolicyConfig(num_nodes=self.num_nodes, num_groups=self.num_groups,
                            max_move=self.max_move, options=dict(self.policy_options))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy (vLLM hashes additional_config into its cache key)."""
        out = dataclasses.asdict(self)
        out["policy_options"] = dict(self.policy_options)
        return out


# --- checks -------------------------------------------------------------------------------


def _check_field(f: dataclasses.Field, value: Any, key: str) -> None:
    meta = f.metadata
    if "choices" in meta:
        if value not in meta["choices"]:
            raise EplbConfigError(f"{key} must be one of {list(meta['choices'])}; got {value!r}.")
    elif meta.get("kind") == "int":
        if value is None and meta["optional"]:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise EplbConfigError(
                f"{key} must be an integer in [{meta['min']}, {meta['max']}]; got {value!r} ({type(value).__name__})."
            )
        if not meta["min"] <= value <= meta["max"]:
            raise EplbConfigError(f"{key} must be in [{meta['min']}, {meta['max']}]; got {value}.")
    elif meta.get("kind") == "float":
        if not is_number(value) or not meta["min"] < value < meta["max"]:
            raise EplbConfigError(
                f"{key} must be a number strictly between {meta['min']} and {meta['max']}; got {value!r}."
            )
    elif f.name == "dynamic_eplb":
        if not isinstance(value, bool):
            raise EplbConfigError(
                f"{key} must be a JSON boolean (true or false); got {value!r} ({type(value).__name__})."
            )
    elif f.name == "policy":
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
            raise EplbConfigError(
                f"{key} must be a policy name or an eplb_policy_type number (0-3); "
                f"got {value!r} ({type(value).__name__})."
            )
    elif f.name == "policy_options":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise EplbConfigError(f"{key} must be a JSON object with string keys; got {value!r}.")
        try:
            json.dumps(dict(value))
        except (TypeError, ValueError) as exc:
            raise EplbConfigError(f"{key} must be JSON-serialisable: {exc}.") from exc


def _check_json_name(path: Any, key: str) -> str:
    if not isinstance(path, str):
        raise EplbConfigError(f"{key} must be a string path to a .json file; got {path!r} ({type(path).__name__}).")
    if not path.strip():
        raise EplbConfigError(f"{key} is an empty string; give the path of a .json expert map or remove the key.")
    if "\x00" in path:
        raise EplbConfigError(f"{key} contains a NUL byte ({path!r}); give a file path.")
    if os.path.splitext(path)[1].lower() != ".json":
        raise EplbConfigError(f"{key} must end in .json; got {path!r}.")
    return path


def _check_expert_map_path(path: Any, key: str) -> None:
    path = _check_json_name(path, key)
    try:
        os.stat(path)
    except FileNotFoundError:
        raise EplbConfigError(
            f"{key}: {path!r} does not exist; write one with `vllm-eplb plan` or fix the path."
        ) from None
    except OSError as exc:  # e.g. a directory on the way that this user cannot enter
        raise EplbConfigError(
            f"{key}: cannot reach {path!r} ({exc.strerror}); check the permissions of its directories."
        ) from None
    if not os.path.isfile(path):
        raise EplbConfigError(f"{key}: {path!r} is not a regular file.")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise EplbConfigError(f"{key}: cannot read {path!r} ({exc.strerror}); check its permissions.") from exc
    try:
        load_expert_map(path)
    except InvalidExpertTable as exc:
        raise EplbConfigError(f"{key}: {exc}") from exc


def _check_record_path(path: Any, key: str) -> None:
    # Only inspect: never create or truncate the file here.
    path = _check_json_name(path, key)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise EplbConfigError(f"{key}: directory {parent!r} does not exist; create it first.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EplbConfigError(f"{key}: directory {parent!r} is not writable.")
    if os.path.exists(path) and not os.path.isfile(path):
        raise EplbConfigError(f"{key}: {path!r} exists and is not a regular file.")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise EplbConfigError(f"{key}: {path!r} exists and is not writable.")
