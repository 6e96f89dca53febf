"""SeerAttention gate files: the trained AttnGate weights of one model (``seer`` method).

A gate file is a safetensors file (tensors and a JSON header, no pickled code):

- ``q_proj``: (n, Hq, 3 D, d_gate) the query projection of each gated layer and query head;
- ``k_proj``: (n, Hkv, 3 D, d_gate) the key projection of each gated layer and KV head;

where 3 D are the mean, max and min of a tile's queries (keys) side by side and n the number
of gated layers. The header (metadata key ``sparseattn``) is JSON:
``{"format": 1, "kind": "seer", "model": {"id", <fingerprint>}, "gate": {"block_size",
"gate_dim", "rope_base", "pools", "layers", "sliding_layers"}, "training": {...}}``;
``gate["layers"]`` lists the gated layers in the order of the tensors' first axis (layers
with their own sliding window are not gated). Weights are stored as float16 (half the size;
the method computes in float32).

Shipped gate files live in ``profiles/gates/`` as ``<model>-seer.safetensors``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from .architecture import FINGERPRINT_KEYS, describe_architecture, fingerprint

GATE_FORMAT = 1
GATES_DIR = Path(__file__).parent / "gates"
SUFFIX = ".safetensors"
POOLS = ("mean", "max", "min")
HEADER_KEY = "sparseattn"


def shipped_gates() -> dict[str, Path]:
    """{name: path} of the gate files shipped in the package, e.g. 'smollm2-135m-seer'."""
    if not GATES_DIR.is_dir():
        return {}
    return {p.name[: -len(SUFFIX)]: p for p in sorted(GATES_DIR.glob("*" + SUFFIX))}


def _model_name(config: Any) -> str:
    name = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    return repr(name) if name else "the hooked model"


@dataclass(frozen=True)
class SeerGates:
    """A loaded gate file.

    Attributes:
        model: The fingerprint plus ``id`` (the name the model was loaded by).
        gate: block_size, gate_dim, rope_base, pools, layers, sliding_layers.
        training: How the gates were trained (knobs, loss, seconds).
        q_proj: (n, Hq, 3 D, d_gate) float32.
        k_proj: (n, Hkv, 3 D, d_gate) float32.
        source: The file it was read from.
    """

    model: dict[str, Any]
    gate: dict[str, Any]
    training: dict[str, Any]
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    source: str

    @property
    def fingerprint(self) -> dict[str, Any]:
        return {k: self.model.get(k) for k in FINGERPRINT_KEYS}

    @property
    def block_size(self) -> int:
        return int(self.gate["block_size"])

    @property
    def rope_base(self) -> float:
        return float(self.gate["rope_base"])

    def check_model(self, config: Any) -> None:
        """UsageError naming both models when the gates were trained for another one."""
        have = fingerprint(config)
        if have != self.fingerprint:
            raise UsageError(
                f"seer gates {self.source} were trained for {self.model.get('id', '?')!r}: "
                f"{describe_architecture(self.fingerprint)}, but the model is "
                f"{_model_name(config)}: {describe_architecture(have)}; train gates for it with "
                f"`sparseattn profile --model MODEL --kind seer --out FILE{SUFFIX}`"
            )

    def check_block_size(self, block_size: int) -> None:
        if block_size != self.block_size:
            raise UsageError(
                f"seer gates {self.source} pool tiles of {self.block_size} tokens, but the "
                f"method has block_size={block_size}; set block_size={self.block_size} or "
                f"train gates with --block-size {block_size}"
            )

    def layer_weights(
        self, layer_idx: int, num_q_heads: int, num_kv_heads: int, head_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Hq, 3 D, d_gate), (Hkv, 3 D, d_gate) of one gated layer; UsageError otherwise."""
        layers = list(self.gate["layers"])
        want = (num_q_heads, num_kv_heads, 3 * head_dim)
        have = (self.q_proj.shape[1], self.k_proj.shape[1], self.q_proj.shape[2])
        if layer_idx not in layers or want != have:
            raise UsageError(
                f"seer gates {self.source} cover layers {layers} with {have[0]} query / "
                f"{have[1]} key-value heads of {have[2] // 3}, but the call is layer {layer_idx} "
                f"with {want[0]} / {want[1]} heads of {head_dim}: they were made for another model"
            )
        slot = layers.index(layer_idx)
        return self.q_proj[slot], self.k_proj[slot]


def resolve_gates(name_or_path: str) -> Path:
    """A gate file path, or the name of a shipped one; UsageError listing the shipped ones."""
    path = Path(name_or_path).expanduser()
    if path.suffix == SUFFIX or path.exists():
        if not path.is_file():
            raise UsageError(f"gate file {str(path)!r} does not exist")
        return path
    shipped = shipped_gates()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise UsageError(
        f"gates {name_or_path!r} are neither a {SUFFIX} file nor shipped gates; "
        f"shipped: {', '.join(shipped) or '(none)'}"
    )


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a gate file (tensors not read); UsageError if it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        header = json.loads(meta.get(HEADER_KEY, "null"))
    except (OSError, ValueError, SafetensorError) as err:
        raise UsageError(f"{path} is not a sparseattn gate file: {err}") from None
    if not isinstance(header, dict) or header.get("format") != GATE_FORMAT:
        raise UsageError(f"{path} is not a sparseattn gate file (format {GATE_FORMAT})")
    if header.get("kind") != "seer":
        raise UsageError(f"{path} holds {header.get('kind')!r} gates; 'seer' gates are needed")
    return header


def load_gates(name_or_path: str) -> SeerGates:
    """Read and check a gate file (a path or a shipped name)."""
    from safetensors.torch import load_file

    path = resolve_gates(name_or_path)
    header = read_header(path)
    tensors = load_file(str(path))
    model, gate = header.get("model", {}), header.get("gate", {})
    q, k = tensors.get("q_proj"), tensors.get("k_proj")
    if q is None or k is None:
        raise UsageError(f"gate file {path} lacks q_proj or k_proj")
    n = len(gate.get("layers", []))
    d = gate.get("gate_dim")
    want_q = (n, model.get("num_attention_heads"), 3 * (model.get("head_dim") or 0), d)
    want_k = (n, model.get("num_key_value_heads"), want_q[2], d)
    if tuple(q.shape) != want_q or tuple(k.shape) != want_k:
        raise UsageError(
            f"gate file {path}: q_proj {tuple(q.shape)} and k_proj {tuple(k.shape)} do not match "
            f"its header ({n} layers, gate_dim {d}): expected {want_q} and {want_k}"
        )
    return SeerGates(model, gate, header.get("training", {}), q.float(), k.float(), str(path))


def save_gates(
    path: str | Path,
    *,
    model: dict[str, Any],
    gate: dict[str, Any],
    training: dict[str, Any],
    q_proj: torch.Tensor,
    k_proj: torch.Tensor,
) -> None:
    """Write a gate file (weights as float16) with its JSON header."""
    from safetensors.torch import save_file

    header = {"format": GATE_FORMAT, "kind": "seer", "model": model, "gate": gate}
    header["training"] = training
    tensors = {
        "q_proj": q_proj.detach().to("cpu", torch.float16).contiguous(),
        "k_proj": k_proj.detach().to("cpu", torch.float16).contiguous(),
    }
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header)})


def gates_for(config: Any) -> SeerGates:
    """The shipped gates whose fingerprint matches ``config``; UsageError saying how to train."""
    have = fingerprint(config)
    for path in shipped_gates().values():
        header = read_header(path)
        if {k: header.get("model", {}).get(k) for k in FINGERPRINT_KEYS} == have:
            return load_gates(str(path))
    raise UsageError(
        f"no shipped seer gates match {describe_architecture(have)}; train them with "
        f"`sparseattn profile --model MODEL --kind seer --out FILE{SUFFIX}` and pass gates=FILE"
    )
