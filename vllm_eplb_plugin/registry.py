"""Finding policies by name: the ``vllm_eplb_plugin.policies`` entry-point group.

Built-in and third-party policies register the same way; ``pip install`` of a package
that declares an entry point in that group makes its policy selectable by name. A policy
can also be named as ``"package.module:Class"``, and vLLM Ascend's numeric
``eplb_policy_type`` values resolve to names.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from importlib.metadata import EntryPoint, entry_points

from .policy import EplbPolicy, PolicyConfig

__all__ = [
    "ENTRY_POINT_GROUP",
    "DEFAULT_POLICY",
    "ASCEND_POLICY_TYPES",
    "PolicyNotFound",
    "PolicyLoadError",
    "available_policies",
    "resolve_policy_name",
    "load_policy_class",
    "create_policy",
]

ENTRY_POINT_GROUP = "vllm_eplb_plugin.policies"

DEFAULT_POLICY = "swift"
"""What ``"default"`` (and an unset ``policy``) selects: chosen from ``benchmarks/policies.py``
(balance on par with the best, about a quarter of the weight moves)."""

ASCEND_POLICY_TYPES = {0: "random", 1: "deepseek", 2: "swift", 3: "flashlb"}
"""vLLM Ascend's ``eplb_policy_type`` -> our policy name."""


class PolicyNotFound(LookupError):
    """No policy of that name is installed."""


class PolicyLoadError(ImportError):
    """A policy's entry point or module is installed but fails to import."""


def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        # The same distribution can be seen twice (editable install + sys.path); keep one.
        found.setdefault(ep.name, ep)
    return found


def available_policies() -> list[str]:
    """Names of every registered policy, sorted. Nothing is imported, so a policy that
    fails to import is still listed; ``create_policy`` reports why it fails."""
    return sorted(_entry_points())


def resolve_policy_name(name: str | int | None) -> str:
    """Map ``None`` / ``"default"`` / an ``eplb_policy_type`` number to a policy name."""
    if name is None or name == "default":
        return DEFAULT_POLICY
    if isinstance(name, int) and not isinstance(name, bool):
        if name not in ASCEND_POLICY_TYPES:
            raise PolicyNotFound(
                f"eplb_policy_type {name} is not one of vLLM Ascend's types "
                f"{ {k: v for k, v in ASCEND_POLICY_TYPES.items()} }; use one of {sorted(ASCEND_POLICY_TYPES)} "
                f"or a policy name."
            )
        return ASCEND_POLICY_TYPES[name]
    if not isinstance(name, str) or not name.strip():
        raise PolicyNotFound(f"policy must be a non-empty name or an eplb_policy_type number; got {name!r}.")
    return name.strip()


def _check_class(obj: object, origin: str) -> type[EplbPolicy]:
    if not (isinstance(obj, type) and issubclass(obj, EplbPolicy)):
        raise PolicyLoadError(f"{origin} is {obj!r}, not a subclass of vllm_eplb_plugin.EplbPolicy.")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise PolicyLoadError(f"{origin} is abstract: implement {missing}.")
    return obj


def load_policy_class(name: str | int | None) -> type[EplbPolicy]:
    """The policy class for a registered name, a number, or ``"package.module:Class"``."""
    resolved = resolve_policy_name(name)
    if ":" in resolved:
        module_name, _, attr = resolved.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise PolicyLoadError(f"cannot import module {module_name!r} of policy {resolved!r}: {exc!r}") from exc
        if not hasattr(module, attr):
            raise PolicyLoadError(f"module {module_name!r} has no attribute {attr!r} (policy {resolved!r}).")
        return _check_class(getattr(module, attr), f"policy {resolved!r}")
    eps = _entry_points()
    if resolved not in eps:
        hint = difflib.get_close_matches(resolved, list(eps), n=1)
        suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
        via = f" (eplb_policy_type {name})" if isinstance(name, int) else ""
        raise PolicyNotFound(
            f"no EPLB policy named {resolved!r}{via}.{suggestion} Available: {', '.join(sorted(eps)) or 'none'}. "
            f"Install a package that registers it under the entry-point group {ENTRY_POINT_GROUP!r}, "
            f"or pass 'package.module:Class'."
        )
    ep = eps[resolved]
    try:
        obj = ep.load()
    except Exception as exc:
        raise PolicyLoadError(f"policy {resolved!r} (entry point {ep.value!r}) fails to import: {exc!r}") from exc
    return _check_class(obj, f"entry point {resolved!r} ({ep.value})")


def create_policy(name: str | int | None = None, config: PolicyConfig | None = None) -> EplbPolicy:
    """Instantiate a policy by name (see ``load_policy_class``) with ``config``."""
    return load_policy_class(name)(config if config is not None else PolicyConfig())
