"""What a frontier run sweeps: settings (knob grids of methods and policies) and task specs."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import tomllib

from ..errors import UsageError
from ..parsing import parse_value
from ..registry import get_method_class, get_policy_class
from ..setting import Setting, Spec

EVICT_PREFIX = "evict:"  # grid targets naming an eviction policy: evict:streaming.window=...


class TaskSpec(Spec):
    """A task with fixed knobs; ``label`` names it in records and reports."""

    def build(self):
        from .tasks import build_task

        return build_task(self.name, **self.knobs)


def parse_task_spec(text: str) -> TaskSpec:
    """'niah_single' or 'niah_single:haystack=kv,needles=2'."""
    name, _, rest = text.partition(":")
    knobs = {}
    for pair in filter(None, rest.split(",")):
        if "=" not in pair:
            raise UsageError(
                f"bad task spec {text!r}: knobs are name=value, e.g. niah_single:haystack=kv"
            )
        key, value = pair.split("=", 1)
        knobs[key.strip()] = parse_value(value.strip())
    spec = TaskSpec(name.strip(), knobs)
    spec.build()  # validates name and knobs now, before any compute
    return spec


def parse_task_list(text: str) -> list[TaskSpec]:
    """'niah_single:haystack=kv,needles=2,qa' -> two specs: a name=value item joins the task before it."""
    items: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" in part and ":" not in part and items:
            items[-1] += "," + part
        else:
            items.append(part)
    return [parse_task_spec(item) for item in items]


def default_task_specs() -> list[TaskSpec]:
    """Every registered task; the needle tasks in RULER's format (the harder one for eviction,
    see docs/tasks.md), niah_single once per haystack."""
    from .tasks import TASKS, list_tasks
    from .tasks.niah import NeedleTask

    specs = []
    for name in list_tasks():
        knobs = {"format": "ruler"} if issubclass(TASKS[name], NeedleTask) else {}
        if name == "niah_single":
            specs += [TaskSpec(name, {**knobs, "haystack": h}) for h in ("noise", "kv", "prose")]
        else:
            specs.append(TaskSpec(name, knobs))
    return specs


def parse_grid_args(items: list[str]) -> dict[str, dict[str, list[Any]]]:
    """['xattention.threshold=0.8,0.9'] -> {'xattention': {'threshold': [0.8, 0.9]}}.

    A target ``evict:POLICY.KNOB`` sets the grid of an eviction policy.
    """
    grids: dict[str, dict[str, list[Any]]] = {}
    for item in items or []:
        target, _, values = item.partition("=")
        method, _, knob = target.partition(".")
        if not method or not knob or not values:
            raise UsageError(f"bad --grid {item!r}; expected METHOD.KNOB=V1,V2,...")
        grids.setdefault(method, {})[knob] = [parse_value(v) for v in values.split(",")]
    return grids


def load_grid_file(path: str | Path) -> dict[str, dict[str, list[Any]]]:
    """A TOML file with one table per method (``[streaming]`` then ``window = [256, 512]``) and
    one per eviction policy (``["evict:streaming"]``)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"grid file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"grid file {path} is not valid TOML: {err}") from None
    return {
        m: {k: v if isinstance(v, list) else [v] for k, v in knobs.items()}
        for m, knobs in data.items()
    }


def _grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def expand_settings(
    methods: list[str],
    grids: dict[str, dict[str, list[Any]]],
    *,
    decode: list[str] = (),
    evict: list[str] = (),
    combos: list[str] = (),
) -> list[Setting]:
    """Every setting of a sweep, dense first; each is built once here, so a bad name, knob or
    value fails before any compute.

    Args:
        methods: One method for every phase it supports: the cartesian product of its grid (its
            default grid unless ``grids`` overrides it).
        grids: Knob values per method name, and per ``evict:POLICY``.
        decode: Decode methods run after a dense prefill (their grids as for ``methods``).
        evict: Eviction policies with dense attention (their ``evict:`` grids).
        combos: Explicit settings, e.g. 'prefill=xattention;decode=quest[budget=512]'.
    """
    named = set(methods) | set(decode) | {EVICT_PREFIX + p for p in evict}
    unknown_grid = sorted(set(grids) - named)
    if unknown_grid:
        raise UsageError(
            f"--grid names {unknown_grid}, which are not among the swept methods {sorted(methods)}"
            f", decode methods {sorted(decode)} or policies {sorted(evict)}"
        )
    settings: list[Setting] = [Setting()]
    for method in [m for m in methods if m != "dense"]:
        grid = {**get_method_class(method).default_grid, **grids.get(method, {})}
        settings += [Setting.single(method, knobs) for knobs in _grid_points(grid)]
    for method in decode:
        grid = {**get_method_class(method).default_grid, **grids.get(method, {})}
        settings += [Setting(decode=Spec(method, knobs)) for knobs in _grid_points(grid)]
    for policy in evict:
        grid = {**get_policy_class(policy).default_grid, **grids.get(EVICT_PREFIX + policy, {})}
        settings += [Setting(evict=Spec(policy, knobs)) for knobs in _grid_points(grid)]
    settings += [Setting.parse(text) for text in combos]
    unique = list(dict.fromkeys(settings))
    for setting in unique:
        setting.parts  # builds and validates every method and policy now
    return unique
