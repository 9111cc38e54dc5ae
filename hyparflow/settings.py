"""Settings resolved and validated once, before any rank communicates.

A layout keyword left as None comes from its HYPARFLOW_* environment variable (what
`hyparflow run` passes to the ranks), else its default. Every check raises the same
`ConfigError` on every rank, since every rank sees the same arguments.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hyparflow.errors import ConfigError
from hyparflow.placement import check_grid
from hyparflow.schedule import check_schedule


def boolean(raw: str) -> bool:
    """An environment variable's on/off value: 1/0, true/false, yes/no, on/off."""
    value = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if raw.strip().lower() not in value:
        raise ValueError(raw)
    return value[raw.strip().lower()]


# Layout keyword -> (environment variable, default, parser): `hyparflow run` flags use the same names.
LAYOUT_ENV: dict[str, tuple[str, Any, Callable[[str], Any]]] = {
    "num_partitions": ("HYPARFLOW_PARTITIONS", 1, int),
    "num_replicas": ("HYPARFLOW_REPLICAS", None, int),
    "num_microbatches": ("HYPARFLOW_MICROBATCHES", 1, int),
    "schedule": ("HYPARFLOW_SCHEDULE", "1f1b", str),
    "virtual_stages": ("HYPARFLOW_VIRTUAL_STAGES", None, int),
    "recompute": ("HYPARFLOW_RECOMPUTE", False, boolean),
}


def positive_int(name: str, value: Any, minimum: int = 1, what: str = "") -> int:
    """`value` as an int, or a ConfigError naming `name` if it is not an integer >= minimum."""
    import numpy as np

    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ConfigError(f"{name} must be {kind}{what}, got {value!r}.")
    return int(value)


def switch(name: str, value: bool | None) -> bool:
    """An on/off keyword: `value`, else its environment variable, else its default."""
    value = from_env(name, value)
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}.")
    return value


def from_env(name: str, value: Any) -> Any:
    """`value`, else its environment variable's value, else the default."""
    if value is not None:
        return value
    var, default, kind = LAYOUT_ENV[name]
    raw = os.environ.get(var)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not a valid {kind.__name__}.") from None


@dataclass(frozen=True)
class Layout:
    """The grid and pipeline settings of a session."""

    num_partitions: int
    num_replicas: int
    num_microbatches: int
    schedule: str
    placement: str
    virtual_stages: int = 1  # stages a rank holds: the plan has num_partitions x virtual_stages

    @property
    def num_stages(self) -> int:
        return self.num_partitions * self.virtual_stages

    @classmethod
    def resolve(
        cls,
        world_size: int,
        num_partitions: int | None = None,
        num_replicas: int | None = None,
        num_microbatches: int | None = None,
        schedule: str | None = None,
        placement: str = "pipeline",
        virtual_stages: int | None = None,
    ) -> Layout:
        P = positive_int("num_partitions", from_env("num_partitions", num_partitions))
        R = from_env("num_replicas", num_replicas)
        if R is None:
            if world_size % P:
                raise ConfigError(
                    f"The job has {world_size} ranks, not a multiple of num_partitions={P}; launch with -np k*{P}."
                )
            R = world_size // P
        R = positive_int("num_replicas", R)
        M = positive_int("num_microbatches", from_env("num_microbatches", num_microbatches))
        kind = check_schedule(from_env("schedule", schedule))
        v = from_env("virtual_stages", virtual_stages)
        if kind == "interleaved":
            v = positive_int("virtual_stages", 2 if v is None else v, minimum=2, what=" under schedule='interleaved'")
        elif v not in (None, 1):
            raise ConfigError(
                f"virtual_stages={v!r} needs schedule='interleaved' (schedule={kind!r} runs one stage a rank)."
            )
        check_grid(world_size, P, R, placement)
        return cls(P, R, M, kind, placement, v or 1)
