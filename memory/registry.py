"""Memory policies by name, as the CLI, configs and service choose them, and their options.

A policy's options are its dataclass fields (all but `probe`, which comes from the [probe]
section of a config), so every front end checks the same names and types.
"""

from __future__ import annotations

import dataclasses
import typing

from memory.baselines import FullPolicy, PyramidPolicy, RandomPolicy, RecentPolicy, UniformPolicy, WindowPolicy
from memory.emloc import EmlocPolicy
from memory.policy import MemoryPolicy, ProbedPolicy
from memory.probe import ProbeConfig

POLICIES: dict[str, type[MemoryPolicy]] = {
    cls.name: cls for cls in (FullPolicy, EmlocPolicy, UniformPolicy, PyramidPolicy, WindowPolicy, RecentPolicy, RandomPolicy)
}


def policy_options(name: str) -> dict[str, type]:
    """Option name -> type (float, int, list[float], ...) of the policy `name`."""
    cls = POLICIES[name]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name != "probe"}


def policies_with(option: str) -> list[str]:
    """The policies that take `option` (e.g. which ones a --ratio applies to)."""
    return [name for name in POLICIES if option in policy_options(name)]


def make_policy(name: str, options: dict | None = None, probe: ProbeConfig | None = None) -> MemoryPolicy:
    """Build a policy by name from its options; unknown names and options are refused by name."""
    if name not in POLICIES:
        raise ValueError(f"unknown memory policy {name!r}; choose one of {', '.join(POLICIES)}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(policy_options(name)))
    if unknown:
        raise ValueError(f"bad options for memory policy {name!r}: unknown {unknown}; "
                         f"known: {sorted(policy_options(name))}")
    cls = POLICIES[name]
    if issubclass(cls, ProbedPolicy):
        options["probe"] = probe or ProbeConfig()
    return cls(**options)
