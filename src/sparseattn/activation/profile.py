"""Activations profiles: calibrated per-layer thresholds (and R-Sparse's splits) for one model.

Written by ``sparseattn profile --kind activations`` (``bench/activations.py``). A file holds:

- ``model``: the architecture fingerprint (``profiles.fingerprint``) plus ``hidden_size`` and
  ``intermediate_size``, and the ``id`` the model was loaded by: a profile made for another
  architecture is refused by name;
- ``sites``: the decoder layer's linear layers by their name in the layer
  (``self_attn.q_proj`` ... ``mlp.down_proj``) and ``mlp.act``, CATS's |act(gate_proj(x))|;
- ``levels``: sparsities 0, 0.025, ... 0.95; ``thresholds[level][layer][site]`` is the
  ``level``-quantile of |input| at that site over the calibration tokens (0 at level 0), so
  dropping |x| < threshold drops that share of a row's channels; a sparsity between two
  levels takes the threshold interpolated linearly between them;
- ``rsparse``: for each of a few sparsities, ``rsparse[level][layer][site]`` is the share of
  the layer's weight budget R-Sparse spends on exact sparse channels (the rest on a low-rank
  part), chosen per layer by ``bench/activations.py``;
- ``teal_greedy`` (optional): for each of a few block sparsities, ``teal_greedy[level][layer][site]``
  is the sparsity TEAL's greedy allocation gives that site (``bench/teal_greedy.py``), read by
  ``teal[allocation=greedy]``.

Shipped profiles live in ``profiles/activations/<model>-activations.json`` (a folder of their
own: their tables are per site, not per head).
"""

from __future__ import annotations

import bisect
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UsageError
from ..profiles import SHIPPED_DIR, fingerprint
from ..profiles.architecture import describe_architecture

FORMAT = 1
KIND = "activations"
SKIP_FIRST = 4  # calibration leaves out each input's first positions (attention-sink outliers)
ACT_SITE = "mlp.act"  # CATS's site: |act(gate_proj(x))|, the up / down projections' channels
SHIPPED_ACTIVATIONS = SHIPPED_DIR / "activations"


def model_facts(config: Any) -> dict[str, Any]:
    """The architecture a profile must match: the fingerprint, hidden and MLP widths."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return {
        **fingerprint(config),
        "hidden_size": config.hidden_size,
        "intermediate_size": getattr(config, "intermediate_size", None),
    }


@dataclass(frozen=True)
class ActivationProfile:
    """A loaded activations profile (see the module docstring for the tables)."""

    model: dict[str, Any]
    calibration: dict[str, Any]
    sites: tuple[str, ...]
    levels: tuple[float, ...]
    thresholds: dict[float, list[list[float]]]
    rsparse: dict[float, list[list[float]]]
    source: str
    teal_greedy: dict[float, list[list[float]]] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.thresholds[self.levels[0]])

    def check_model(self, model: nn.Module) -> None:
        """UsageError when the profile was made for another architecture than ``model``'s."""
        have = model_facts(model.config)
        want = {k: self.model.get(k) for k in have}
        if have != want:
            raise UsageError(
                f"activations profile {self.source} was made for {self.model.get('id', '?')}: "
                f"{_describe(want)}, but the model is {_describe(have)}; make one for it with "
                "`sparseattn profile --model MODEL --kind activations --out FILE.json`"
            )

    def threshold(self, layer_idx: int, site: str, sparsity: float) -> float:
        """The threshold on |x| at ``site`` of layer ``layer_idx`` that drops ``sparsity`` of a
        row's channels (linear between the two stored levels around it; 0 at sparsity 0)."""
        if sparsity <= 0.0:
            return 0.0
        column = self._column(site)
        upper = min(bisect.bisect_left(self.levels, sparsity), len(self.levels) - 1)
        lower = max(upper - 1, 0)
        lo, hi = self.levels[lower], self.levels[upper]
        t_lo = self.thresholds[lo][layer_idx][column]
        t_hi = self.thresholds[hi][layer_idx][column]
        if hi <= lo or sparsity >= hi:
            return float(t_hi)
        share = (sparsity - lo) / (hi - lo)
        return float(t_lo + share * (t_hi - t_lo))

    def sparse_share(self, layer_idx: int, site: str, sparsity: float) -> float:
        """R-Sparse's share of the weight budget on exact channels at ``sparsity``: linear
        between the stored levels, 1 (all channels, no low-rank part) at sparsity 0."""
        if sparsity <= 0.0 or not self.rsparse:
            return 1.0
        column = self._column(site)
        return _per_site(self.rsparse, layer_idx, column, sparsity, at_zero=1.0)

    def greedy_sparsity(self, layer_idx: int, site: str, sparsity: float) -> float:
        """The sparsity TEAL's greedy allocation gives ``site`` of layer ``layer_idx`` when the
        block's is ``sparsity`` (linear between the stored block sparsities, 0 at 0).

        Raises:
            UsageError: the profile has no greedy table, or ``sparsity`` is above its greatest
                stored block sparsity.
        """
        if not self.teal_greedy:
            raise UsageError(
                f"activations profile {self.source} has no greedy allocation (teal_greedy); "
                "remake it with `sparseattn profile --kind activations`, or use "
                "allocation=uniform"
            )
        top = max(self.teal_greedy)
        if sparsity > top + 1e-9:
            raise UsageError(
                f"teal: allocation=greedy is stored up to sparsity {top:g} in {self.source}; "
                f"got sparsity={sparsity:g} (allowed: 0 to {top:g}, or allocation=uniform)"
            )
        if sparsity <= 0.0:
            return 0.0
        return _per_site(self.teal_greedy, layer_idx, self._column(site), sparsity, at_zero=0.0)

    def _column(self, site: str) -> int:
        if site not in self.sites:
            raise UsageError(
                f"activations profile {self.source} has no site {site!r}; it has "
                f"{', '.join(self.sites)} (made for another architecture?)"
            )
        return self.sites.index(site)


def _per_site(
    table: dict[float, list[list[float]]],
    layer_idx: int,
    column: int,
    sparsity: float,
    at_zero: float,
) -> float:
    """A (layer, site) value of a per-level table at ``sparsity``: linear between the stored
    levels, ``at_zero`` at sparsity 0, the last level's value beyond it."""
    points = [(0.0, at_zero)] + [
        (level, float(table[level][layer_idx][column])) for level in sorted(table)
    ]
    for (s0, r0), (s1, r1) in itertools.pairwise(points):
        if sparsity <= s1 + 1e-12:
            return r0 + (sparsity - s0) / (s1 - s0) * (r1 - r0)
    return points[-1][1]


def _describe(facts: dict[str, Any]) -> str:
    return (
        f"{describe_architecture(facts)}, hidden {facts.get('hidden_size')}, "
        f"MLP {facts.get('intermediate_size')}"
    )


def shipped_activation_profiles() -> dict[str, Path]:
    """{name: path} of the shipped activations profiles, e.g. 'smollm2-135m-activations'."""
    return {p.stem: p for p in sorted(SHIPPED_ACTIVATIONS.glob("*.json"))}


def resolve_activation_profile(name_or_path: str) -> Path:
    """A .json path or a shipped profile's name; UsageError naming the shipped ones."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UsageError(f"activations profile {str(path)!r} does not exist")
        return path
    shipped = shipped_activation_profiles()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise UsageError(
        f"activations profile {name_or_path!r} is neither a .json file nor a shipped profile; "
        f"shipped: {', '.join(shipped) or '(none)'}"
    )


def load_activation_profile(name_or_path: str) -> ActivationProfile:
    """Read and check an activations profile.

    Raises:
        UsageError: missing file, not an activations profile, malformed tables.
    """
    path = resolve_activation_profile(name_or_path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"activations profile {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("kind") != KIND:
        raise UsageError(f"{path} is not a sparseattn activations profile (format {FORMAT})")
    sites = tuple(data.get("sites") or ())
    thresholds = {float(k): v for k, v in (data.get("thresholds") or {}).items()}
    rsparse = {float(k): v for k, v in (data.get("rsparse") or {}).items()}
    greedy = {float(k): v for k, v in (data.get("teal_greedy") or {}).items()}
    layers = data.get("model", {}).get("num_hidden_layers")
    for name, table in [*thresholds.items(), *rsparse.items(), *greedy.items()]:
        ok = isinstance(table, list) and len(table) == layers
        ok = ok and all(isinstance(row, list) and len(row) == len(sites) for row in table)
        if not ok:
            raise UsageError(
                f"activations profile {path}: level {name:g} is not one row of {len(sites)} "
                f"sites per layer ({layers} layers)"
            )
    if not sites or 0.0 not in thresholds:
        raise UsageError(f"activations profile {path} holds no sites or no level 0")
    return ActivationProfile(
        model=data["model"],
        calibration=data.get("calibration", {}),
        sites=sites,
        levels=tuple(sorted(thresholds)),
        thresholds=thresholds,
        rsparse=rsparse,
        source=str(path),
        teal_greedy=greedy or None,
    )


def save_activation_profile(
    path: str | Path,
    *,
    model: dict[str, Any],
    calibration: dict[str, Any],
    sites: list[str],
    thresholds: dict[float, list[list[float]]],
    rsparse: dict[float, list[list[float]]],
    summary: dict[str, Any],
    teal_greedy: dict[float, list[list[float]]] | None = None,
) -> None:
    """Write a profile as JSON, one line per level's table."""

    def tables(named: dict[float, list[list[float]]]) -> str:
        rows = ",\n  ".join(f'"{level:g}": {json.dumps(t)}' for level, t in sorted(named.items()))
        return "{\n  " + rows + "\n}"

    parts = [
        f'"format": {FORMAT}',
        f'"kind": "{KIND}"',
        f'"model": {json.dumps(model)}',
        f'"calibration": {json.dumps(calibration)}',
        f'"sites": {json.dumps(list(sites))}',
        f'"thresholds": {tables(thresholds)}',
        f'"rsparse": {tables(rsparse)}',
        *([f'"teal_greedy": {tables(teal_greedy)}'] if teal_greedy else []),
        f'"summary": {json.dumps(summary)}',
    ]
    Path(path).write_text("{\n" + ",\n".join(parts) + "\n}\n")


def open_activation_profile(name: str) -> ActivationProfile | None:
    """The profile a method's ``profile`` knob names, loaded at once ('auto': at bind time)."""
    return None if name == "auto" else load_activation_profile(name)


def shipped_activation_profile_for(model: nn.Module) -> ActivationProfile:
    """The shipped activations profile made for ``model``'s architecture.

    Raises:
        UsageError: none matches; the message says how to make one.
    """
    have = model_facts(model.config)
    for path in shipped_activation_profiles().values():
        profile = load_activation_profile(str(path))
        if {k: profile.model.get(k) for k in have} == have:
            return profile
    raise UsageError(
        f"no shipped activations profile matches {_describe(have)}; make one with "
        "`sparseattn profile --model MODEL --kind activations --out FILE.json` and pass "
        "profile=FILE.json"
    )


def bind_activation_profile(
    profile: ActivationProfile | None, name: str, model: nn.Module
) -> ActivationProfile:
    """At bind time: 'auto' finds the model's shipped profile; a loaded one is checked."""
    if name == "auto":
        return shipped_activation_profile_for(model)
    assert profile is not None
    profile.check_model(model)
    return profile
