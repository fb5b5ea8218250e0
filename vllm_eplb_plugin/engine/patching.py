"""Patching engine classes, and checking at start-up that every target still exists.

Engines move: a method the plugin wraps can vanish or change its parameters in the next
release. Each engine module lists its :class:`PatchTarget` s; :func:`check_targets`
imports them and compares the parameters the wrapper relies on, so a drifted engine
stops start-up with the target named instead of failing on the first plan.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

_MARK = "_vllm_eplb_plugin_patched"


class EngineMismatch(RuntimeError):
    """The installed engine lacks a method the plugin hooks, or its signature changed."""


@dataclass(frozen=True)
class PatchTarget:
    module: str
    """Module that defines the class, e.g. ``vllm.engine.arg_utils``."""
    attr: str
    """``Class.method`` inside the module."""
    params: tuple[str, ...]
    """Leading parameter names the wrapper relies on (``self`` included)."""

    def __str__(self) -> str:
        return f"{self.module}.{self.attr}({', '.join(self.params)}, ...)"

    def problem(self) -> str | None:
        """Why this target cannot be patched, or None when it can."""
        try:
            obj = importlib.import_module(self.module)
        except ImportError as exc:
            return f"{self}: module does not import ({exc})"
        for part in self.attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return f"{self}: {self.module}.{self.attr} does not exist"
        obj = inspect.unwrap(obj)
        try:
            names = tuple(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            return f"{self}: cannot read its signature"
        if names[: len(self.params)] != self.params:
            return f"{self}: its parameters are now ({', '.join(names)})"
        return None


def check_targets(targets: tuple[PatchTarget, ...], engine: str, supported: str) -> None:
    """Raise :class:`EngineMismatch` naming every target that drifted."""
    problems = [p for p in (t.problem() for t in targets) if p is not None]
    if problems:
        raise EngineMismatch(
            f"eplb: the installed {engine} does not have what the plugin hooks:\n  - "
            + "\n  - ".join(problems)
            + f"\nThe plugin supports {supported}; install one of those or remove the eplb section."
        )


def patch(cls: type, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace ``cls.name`` by ``make(original)``; a second call is a no-op. Static
    methods stay static."""
    original = cls.__dict__.get(name)
    if original is None or getattr(original, _MARK, False):
        return
    static = isinstance(original, staticmethod)
    func = original.__func__ if static else original
    wrapped = functools.wraps(func)(make(func))
    setattr(wrapped, _MARK, True)
    if static:
        wrapped = staticmethod(wrapped)
        setattr(wrapped, _MARK, True)
    setattr(cls, name, wrapped)
