"""Memory policies by name, as the CLI, configs and service choose them."""

from __future__ import annotations

from memory.emloc import EmlocConfig, EmlocPolicy
from memory.policies import (FullConfig, FullPolicy, MemoryPolicy, PyramidConfig, PyramidPolicy, RandomConfig,
                             RandomPolicy, UniformConfig, UniformPolicy, WindowConfig, WindowPolicy)
from memory.probe import ProbeConfig

POLICIES: dict[str, tuple[type[MemoryPolicy], type]] = {
    cls.name: (cls, config) for cls, config in [
        (FullPolicy, FullConfig), (EmlocPolicy, EmlocConfig), (UniformPolicy, UniformConfig),
        (PyramidPolicy, PyramidConfig), (WindowPolicy, WindowConfig), (RandomPolicy, RandomConfig),
    ]
}


def make_policy(name: str, options: dict | None = None, probe: ProbeConfig | None = None) -> MemoryPolicy:
    """Build a policy by name from its config options; unknown names and options are refused."""
    if name not in POLICIES:
        raise ValueError(f"unknown memory policy {name!r}; choose one of {', '.join(POLICIES)}")
    policy_cls, config_cls = POLICIES[name]
    try:
        config = config_cls(**(options or {}))
    except TypeError as exc:
        raise ValueError(f"bad options for memory policy {name!r}: {exc}") from None
    return policy_cls(config, probe)
