"""Plugin discovery: passes and backends are found through entry points, loaded only when first named."""
from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

PASS_GROUP = "xbitc.passes"
BACKEND_GROUP = "xbitc.backends"


class UnknownPlugin(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@lru_cache(maxsize=None)
def _entries(group: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for ep in entry_points(group=group):
        found.setdefault(ep.name, ep)  # first registration wins; duplicates are reported by `xbitc list-*`
    return found


_extra: dict[str, dict[str, Any]] = {PASS_GROUP: {}, BACKEND_GROUP: {}}


def register(group: str, name: str, obj: Any) -> None:
    """Register a pass or backend class in-process (tests, notebooks) without an installed package."""
    _extra[group][name] = obj


def names(group: str) -> list[str]:
    return sorted(set(_entries(group)) | set(_extra[group]))


def get(group: str, name: str) -> Any:
    if name in _extra[group]:
        return _extra[group][name]
    ep = _entries(group).get(name)
    kind = "pass" if group == PASS_GROUP else "backend"
    if ep is None:
        raise UnknownPlugin(f"unknown {kind} {name!r}; available: {', '.join(names(group))}")
    obj = ep.load()
    _extra[group][name] = obj
    return obj


def origin(group: str, name: str) -> str:
    ep = _entries(group).get(name)
    return ep.value if ep is not None else "registered in-process"
