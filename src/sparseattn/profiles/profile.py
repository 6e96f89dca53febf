"""The Profile type and its files: names resolved (a path or a shipped profile), read, written."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .architecture import FINGERPRINT_KEYS, describe_architecture, fingerprint

FORMAT = 1
KINDS = ("minference", "xattention", "channels", "retrieval", "duo", "moa")
CHOICE_KINDS = ("minference", "moa")  # heads hold an index into ``choices``
# kinds whose one table is a score in [0, 1] per head, and which heads a row has
SCORE_KINDS = {"retrieval": "num_attention_heads", "duo": "num_key_value_heads"}
SHIPPED_DIR = Path(__file__).parent


def span_at(rule: dict[str, Any], length: int) -> int:
    """A moa span rule's span at ``length`` tokens: alpha + beta * length, floored, kept within
    [1, length] (MoA's elastic rule; the rule's sink is kept besides)."""
    return min(length, max(1, math.floor(rule["alpha"] + rule["beta"] * length)))


def shipped_profiles() -> dict[str, Path]:
    """{name: path} of the profiles shipped in the package, e.g. 'smollm2-135m-minference'."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.json"))}


@dataclass(frozen=True)
class Profile:
    """A loaded profile.

    Attributes:
        kind: One of ``KINDS``.
        model: The fingerprint plus ``id`` (the name the model was loaded by).
        calibration: How it was made: lengths, seed, inputs, block size, ...
        levels: The budgets (minference, tile density; moa, kept share of the KV cache) or
            target recalls (xattention) it holds, ascending; channels, retrieval, duo: the one
            level 0.
        heads: heads[level][layer][head] -> a choice index (minference, moa per KV head) or a
            threshold; channels: heads[0][layer][kv_head] -> that KV head's channels, most
            important first; retrieval: heads[0][layer][q_head] -> retrieval score in [0, 1];
            duo: heads[0][layer][kv_head] -> gate in [0, 1].
        choices: The candidate patterns ({"pattern", "knobs"}) of a minference profile; the
            candidate span rules ({"alpha", "beta", "sink"}) of a moa profile.
        summary: summary[level] -> {name: [...] per layer} (recall and density, ...).
        source: The file it was read from.
    """

    kind: str
    model: dict[str, Any]
    calibration: dict[str, Any]
    levels: tuple[float, ...]
    heads: dict[float, list[list[Any]]]
    choices: list[dict[str, Any]]
    summary: dict[float, dict[str, list[float]]]
    source: str

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The architecture facts of the model the profile was made for."""
        return {k: self.model.get(k) for k in FINGERPRINT_KEYS}

    def check_model(self, config: Any) -> None:
        """UsageError when the profile was made for another architecture than ``config``'s."""
        have, want = fingerprint(config), self.fingerprint
        if have != want:
            raise UsageError(
                f"profile {self.source} was made for {self.model.get('id', '?')}: "
                f"{describe_architecture(want)}, but the model is {describe_architecture(have)}; "
                f"make one for it with "
                f"`sparseattn profile --model MODEL --kind {self.kind} --out FILE.json`"
            )

    def check_settings(self, **settings: Any) -> None:
        """UsageError when a knob differs from the value the profile was calibrated with.

        Knobs the calibration did not record are not checked.
        """
        for name, value in settings.items():
            made = self.calibration.get(name)
            if made is not None and made != value:
                raise UsageError(
                    f"profile {self.source} was calibrated with {name}={made}, but the method has "
                    f"{name}={value}; set {name}={made} or calibrate with "
                    f"--{name.replace('_', '-')} {value}"
                )

    def level_at_least(self, value: float) -> float:
        """The smallest stored level >= value (the largest if none is): a conservative choice."""
        for level in self.levels:
            if level >= value - 1e-9:
                return level
        return self.levels[-1]

    def level_at_most(self, value: float) -> float:
        """The largest stored level <= value (the smallest if none is)."""
        for level in reversed(self.levels):
            if level <= value + 1e-9:
                return level
        return self.levels[0]

    def layer(self, level: float, layer_idx: int, num_heads: int) -> list[Any]:
        """One layer's per-head entries at ``level``: choice dicts (minference, moa) or values.

        Raises:
            UsageError: the profile does not cover this layer and head count.
        """
        table = self.heads[level]
        if layer_idx >= len(table) or len(table[layer_idx]) != num_heads:
            covered = f"{len(table)} layers x {len(table[0]) if table else 0} heads"
            raise UsageError(
                f"profile {self.source} covers {covered}, but the call is layer {layer_idx} "
                f"with {num_heads} heads: it was made for another model"
            )
        row = table[layer_idx]
        return [self.choices[i] for i in row] if self.kind in CHOICE_KINDS else row


def resolve(name_or_path: str) -> Path:
    """A file path, or the name of a shipped profile; UsageError listing the shipped ones."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UsageError(f"profile file {str(path)!r} does not exist")
        return path
    shipped = shipped_profiles()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise UsageError(
        f"profile {name_or_path!r} is neither a .json file nor a shipped profile; "
        f"shipped: {', '.join(shipped) or '(none)'}"
    )


def load_profile(name_or_path: str, kind: str) -> Profile:
    """Read and check a profile of the given kind.

    Raises:
        UsageError: missing file, not a sparseattn profile, wrong kind or malformed tables.
    """
    path = resolve(name_or_path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"profile {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "heads" not in data:
        raise UsageError(f"{path} is not a sparseattn profile (format {FORMAT})")
    if data.get("kind") != kind:
        raise UsageError(f"profile {path} is a {data.get('kind')!r} profile; {kind!r} is needed")
    heads = {float(level): table for level, table in data["heads"].items()}
    if not heads or not all(isinstance(t, list) and t for t in heads.values()):
        raise UsageError(f"profile {path} holds no per-head tables")
    choices = data.get("choices", [])
    _check_rows(path, kind, heads, data.get("model", {}))
    if kind in CHOICE_KINDS:
        n = len(choices)
        bad = [i for t in heads.values() for row in t for i in row if not 0 <= i < n]
        if bad:
            raise UsageError(f"profile {path}: choice index {bad[0]} outside 0..{n - 1}")
    if kind == "moa":
        _check_span_rules(path, choices)
    if kind in SCORE_KINDS:
        if set(heads) != {0.0}:
            raise UsageError(f"profile {path}: a {kind} profile holds one level, 0")
        bad = [x for row in heads[0.0] for x in row if not _unit(x)]
        if bad:
            raise UsageError(f"profile {path}: {kind} value {bad[0]!r} is outside [0, 1]")
    if kind == "channels":
        head_dim = data.get("model", {}).get("head_dim")
        want = list(range(head_dim)) if isinstance(head_dim, int) else None
        bad = [r for t in heads.values() for row in t for r in row if sorted(r) != want]
        if bad:
            raise UsageError(
                f"profile {path}: a channel ranking is not an order of the {head_dim} channels "
                f"of a head: {bad[0]}"
            )
    return Profile(
        kind=kind,
        model=data.get("model", {}),
        calibration=data.get("calibration", {}),
        levels=tuple(sorted(heads)),
        heads=heads,
        choices=choices,
        summary={float(k): v for k, v in data.get("summary", {}).items()},
        source=str(path),
    )


_HEAD_NAMES = {"num_attention_heads": "query head", "num_key_value_heads": "key-value head"}


def _unit(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0


def _check_rows(path: Path, kind: str, heads: dict[float, list], model: dict[str, Any]) -> None:
    """The new kinds: one row per layer, each as long as the model's (query or KV) heads."""
    per_row = SCORE_KINDS.get(kind) or ("num_key_value_heads" if kind == "moa" else None)
    if per_row is None:
        return
    layers, width = model.get("num_hidden_layers"), model.get(per_row)
    for level, table in heads.items():
        shape_ok = all(isinstance(row, list) for row in table)
        if not shape_ok or (layers is not None and len(table) != layers):
            raise UsageError(
                f"profile {path}: level {level:g} has {len(table)} rows; one per layer "
                f"({layers}) is needed"
            )
        if width is not None and any(len(row) != width for row in table):
            raise UsageError(
                f"profile {path}: level {level:g} has a row that is not {width} entries long "
                f"(one per {_HEAD_NAMES[per_row]})"
            )


def _check_span_rules(path: Path, choices: list[Any]) -> None:
    """Every moa choice is {"alpha": int, "beta": float in [0, 1], "sink": int >= 0}."""
    for choice in choices:
        ok = isinstance(choice, dict) and set(choice) == {"alpha", "beta", "sink"}
        ok = ok and isinstance(choice["alpha"], int) and _unit(choice["beta"])
        ok = ok and isinstance(choice["sink"], int) and choice["sink"] >= 0
        if not ok:
            raise UsageError(
                f"profile {path}: span rule {choice!r} is not "
                '{"alpha": int, "beta": float in [0, 1], "sink": int >= 0}'
            )


def save_profile(
    path: str | Path,
    *,
    kind: str,
    model: dict[str, Any],
    calibration: dict[str, Any],
    heads: dict[float, list[list[Any]]],
    summary: dict[float, dict[str, list[float]]],
    choices: list[dict[str, Any]] | None = None,
) -> None:
    """Write a profile as compact JSON, one line per level's table."""
    key = "{:g}".format
    parts = [
        f'"format": {FORMAT}',
        f'"kind": {json.dumps(kind)}',
        f'"model": {json.dumps(model)}',
        f'"calibration": {json.dumps(calibration)}',
    ]
    if choices is not None:
        parts.append('"choices": [\n  ' + ",\n  ".join(map(json.dumps, choices)) + "\n]")
    tables = ",\n  ".join(f'"{key(lv)}": {json.dumps(t)}' for lv, t in sorted(heads.items()))
    parts.append('"heads": {\n  ' + tables + "\n}")
    sums = ",\n  ".join(f'"{key(lv)}": {json.dumps(v)}' for lv, v in sorted(summary.items()))
    parts.append('"summary": {\n  ' + sums + "\n}")
    Path(path).write_text("{\n" + ",\n".join(parts) + "\n}\n")
