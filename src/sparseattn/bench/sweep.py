"""What a frontier run sweeps: method settings (knob grids) and task specs, parsed and validated."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..errors import UsageError
from ..parsing import parse_value
from ..registry import build_method, get_method_class
from .runner import Setting, labelled


@dataclass(frozen=True)
class TaskSpec:
    """A task with fixed knobs; ``label`` names it in records and reports."""

    name: str
    knobs: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return labelled(self.name, self.knobs)

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
    """Every registered task with default knobs; niah_single once per haystack."""
    from .tasks import list_tasks

    specs = []
    for name in list_tasks():
        if name == "niah_single":
            specs += [TaskSpec(name, {"haystack": h}) for h in ("noise", "kv", "prose")]
        else:
            specs.append(TaskSpec(name))
    return specs


def parse_grid_args(items: list[str]) -> dict[str, dict[str, list[Any]]]:
    """['xattention.threshold=0.8,0.9'] -> {'xattention': {'threshold': [0.8, 0.9]}}."""
    grids: dict[str, dict[str, list[Any]]] = {}
    for item in items or []:
        target, _, values = item.partition("=")
        method, _, knob = target.partition(".")
        if not method or not knob or not values:
            raise UsageError(f"bad --grid {item!r}; expected METHOD.KNOB=V1,V2,...")
        grids.setdefault(method, {})[knob] = [parse_value(v) for v in values.split(",")]
    return grids


def load_grid_file(path: str | Path) -> dict[str, dict[str, list[Any]]]:
    """A TOML file with one table per method: ``[streaming]`` then ``window = [256, 512]``."""
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


def expand_settings(methods: list[str], grids: dict[str, dict[str, list[Any]]]) -> list[Setting]:
    """Cartesian product of each method's grid (its default grid unless overridden); dense first.

    Every setting is built once here so a bad method, knob or value fails before any compute.
    """
    unknown_grid = sorted(set(grids) - set(methods))
    if unknown_grid:
        raise ValueError(
            f"--grid names method(s) {unknown_grid} that are not in --methods {methods}"
        )
    ordered = ["dense"] + [m for m in methods if m != "dense"]
    settings: list[Setting] = []
    for method in ordered:
        cls = get_method_class(method)
        grid = {**cls.default_grid, **grids.get(method, {})}
        keys = sorted(grid)
        for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
            knobs = dict(zip(keys, values))
            build_method(method, **knobs)
            settings.append(Setting(method, knobs))
    return settings
