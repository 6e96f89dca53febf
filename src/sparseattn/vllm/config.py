"""What the vLLM plugin runs: a ``Setting`` read from the environment or vLLM's additional
config, checked against what fits vLLM's paged layout (no vLLM import here).

The setting uses the spec syntax of ``--setting`` (``sparseattn.setting.Setting.parse``)::

    SPARSEATTN_SETTING='prefill=xattention[threshold=0.9];decode=quest[budget=1024]'

or, per engine, ``LLM(..., additional_config={"sparseattn": {"setting": "...", ...}})``
(``vllm serve --additional-config '{"sparseattn": {...}}'``); the additional config wins over
the environment. No setting (or ``dense``) leaves vLLM's own CPU backend in charge, unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..methods.base import PREFILL_PHASES
from ..methods.static import Dense
from ..parsing import parse_value
from ..registry import METHODS, POLICIES, get_method_class
from ..setting import Setting
from ..types import Phase

SETTING_ENV = "SPARSEATTN_SETTING"
OPTIONS_ENV = "SPARSEATTN_VLLM_OPTIONS"  # JSON object of PluginConfig options
CONFIG_KEY = "sparseattn"  # the key of vLLM's additional_config the plugin reads
DECODE_METHODS = ("dense", "quest", "streaming", "strided")  # page-level: they fit vLLM's blocks
HEAD_POLICIES = ("duo", "lserve", "moa", "razor")
DEFAULT_MIN_LENGTH = 1024  # key length below which a call stays dense (as the HF hook's decode)


@dataclass(frozen=True)
class PluginConfig:
    """The plugin's setting and how it runs (validated on creation).

    Attributes:
        setting: The prefill and decode methods; None: vLLM's own backend runs every call.
        source: Where the setting came from (for the engine log).
        min_length: Calls whose key length is below this run vLLM's own dense kernel.
        prefill_backend: Tile kernel of sparse prefill ("auto": C++ on CPU float32, else flex).
        dense_layers: Layer indices that always run vLLM's own dense kernel.
    """

    setting: Setting | None = None
    source: str = "none"
    min_length: int = DEFAULT_MIN_LENGTH
    prefill_backend: str = "auto"
    dense_layers: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        from ..backends.tiles import PREFILL_BACKENDS

        bad = isinstance(self.min_length, bool) or not isinstance(self.min_length, int)
        if bad or self.min_length < 0:
            raise UsageError(f"sparseattn vLLM option min_length={self.min_length!r}: int >= 0")
        if self.prefill_backend not in PREFILL_BACKENDS:
            raise UsageError(
                f"sparseattn vLLM option prefill_backend={self.prefill_backend!r}; "
                f"allowed: {list(PREFILL_BACKENDS)}"
            )
        if self.setting is not None:
            check_supported(self.setting)

    @property
    def active(self) -> bool:
        """Whether any phase runs a sparse method (else the plugin only delegates)."""
        if self.setting is None:
            return False
        prefill, decode, _ = self.setting.parts
        return not (isinstance(prefill, Dense) and isinstance(decode, Dense))

    @property
    def label(self) -> str:
        return "dense (vLLM's own backend)" if self.setting is None else self.setting.label

    def describe(self) -> str:
        """One line for the engine log."""
        if not self.active:
            return f"sparseattn: setting {self.label}; vLLM's CPU attention runs every call"
        phases = self.setting.phase_policy()
        return (
            f"sparseattn: setting {self.setting.label!r} (from {self.source}): prefill "
            f"{phases['prefill']}, decode {phases['decode']}, min_length {self.min_length}, "
            f"prefill kernel {self.prefill_backend}"
        )


def check_supported(setting: Setting) -> None:
    """Refuse, by name, what cannot run on vLLM's paged cache.

    Raises:
        UsageError: an eviction or head policy (vLLM frees whole blocks across every head,
            so dropping tokens per head would free no memory), a prompt ``chunk`` (vLLM
            schedules its own chunks), or a decode method that is not page-level.
    """
    if setting.evict is not None:
        name = setting.evict.name
        kind = "head-level policy" if name in HEAD_POLICIES else "eviction policy"
        raise UsageError(
            f"sparseattn in vLLM: {kind} {name!r} is not supported: vLLM frees whole blocks for "
            "every head of a sequence at once, so evicting tokens (per head or not) would free "
            "no memory there; run it through the Hugging Face hook (see docs/vllm.md)"
        )
    if getattr(setting, "activation", None) is not None:
        raise UsageError(
            f"sparseattn in vLLM: activation={setting.activation.name!r} is not supported: it "
            "replaces the model's linear layers, which vLLM owns; run it through the Hugging "
            "Face hook (see docs/vllm.md)"
        )
    if setting.chunk is not None:
        raise UsageError(
            f"sparseattn in vLLM: chunk={setting.chunk} is not supported: vLLM chunks prompts "
            "itself (--max-num-batched-tokens); drop chunk= from the setting"
        )
    decode_cls = get_method_class(setting.decode.name)
    if Phase.DECODE in decode_cls.phases and decode_cls.name not in DECODE_METHODS:
        raise UsageError(
            f"sparseattn in vLLM: decode method {decode_cls.name!r} is not supported (it needs "
            "per-token or cross-layer state on a contiguous cache); page-level decode methods "
            f"that run in vLLM: {', '.join(DECODE_METHODS)}; the others run through the "
            "Hugging Face hook (see docs/vllm.md)"
        )
    _, decode, _ = setting.parts  # builds the methods: bad names and knobs fail here, by name
    if getattr(decode, "per_query_head", False):
        raise UsageError(
            "sparseattn in vLLM: quest per_query_head=True is not supported (pages are chosen "
            "per KV head, one gather per KV head); drop the knob or use the Hugging Face hook"
        )


def supported_methods() -> dict[str, list[str]]:
    """Registered names by what the plugin does with them (for the docs and the log)."""
    prefill = sorted(n for n, c in METHODS.items() if c.phases & PREFILL_PHASES)
    decode = [n for n in DECODE_METHODS if n in METHODS]
    hf_only = sorted(
        n for n, c in METHODS.items() if Phase.DECODE in c.phases and n not in DECODE_METHODS
    )
    return {"prefill": prefill, "decode": decode, "hf_only": hf_only + sorted(POLICIES)}


def plugin_config(
    additional_config: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> PluginConfig:
    """The plugin's configuration from vLLM's ``additional_config`` and the environment.

    ``additional_config["sparseattn"]`` is a setting string or a mapping with ``setting`` and
    the options of ``PluginConfig``; otherwise ``$SPARSEATTN_SETTING`` gives the setting and
    ``$SPARSEATTN_VLLM_OPTIONS`` (JSON) the options.

    Raises:
        UsageError: a malformed setting or option, or an unsupported method (by name).
    """
    environ = os.environ if environ is None else environ
    entry = (additional_config or {}).get(CONFIG_KEY)
    if entry is not None:
        source = f"additional_config[{CONFIG_KEY!r}]"
        entry = {"setting": entry} if isinstance(entry, str) else dict(entry)
    else:
        source = f"${SETTING_ENV}"
        entry = _env_options(environ)
        if environ.get(SETTING_ENV, "").strip():
            entry["setting"] = environ[SETTING_ENV]
    text = entry.pop("setting", None)
    options = _options(entry)
    if text is None or not str(text).strip():
        return PluginConfig(source="none", **options)
    return PluginConfig(setting=Setting.parse(str(text)), source=source, **options)


def _env_options(environ: Mapping[str, str]) -> dict[str, Any]:
    raw = environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UsageError(f"${OPTIONS_ENV} is not JSON ({err}): {raw!r}") from None
    if not isinstance(options, dict):
        raise UsageError(f"${OPTIONS_ENV} must be a JSON object, got {raw!r}")
    return options


def _options(entry: dict[str, Any]) -> dict[str, Any]:
    allowed = {"min_length", "prefill_backend", "dense_layers"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise UsageError(
            f"unknown sparseattn vLLM option(s) {', '.join(map(repr, unknown))}; "
            f"allowed: setting, {', '.join(sorted(allowed))}"
        )
    options = dict(entry)
    if isinstance(options.get("min_length"), str):
        options["min_length"] = parse_value(options["min_length"])
    if "dense_layers" in options:
        options["dense_layers"] = frozenset(int(i) for i in options["dense_layers"])
    return options


def check_block_size(config: PluginConfig, block_size: int) -> None:
    """Refuse a Quest page size that does not divide vLLM's cache block size (its page bounds
    are kept per (block, page of the block)).

    Raises:
        UsageError: naming both sizes and the allowed page sizes.
    """
    if config.setting is None or config.setting.decode.name != "quest":
        return
    _, decode, _ = config.setting.parts
    if block_size % decode.block_size:
        allowed = [p for p in (8, 16, 32, 64, 128) if block_size % p == 0]
        raise UsageError(
            f"sparseattn in vLLM: quest block_size={decode.block_size} must divide vLLM's "
            f"cache block size {block_size}; allowed here: {allowed}"
        )
