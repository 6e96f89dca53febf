"""The architecture facts a profile is made for, read from a transformers config."""

from __future__ import annotations

from typing import Any

FINGERPRINT_KEYS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


def fingerprint(config: Any) -> dict[str, Any]:
    """The architecture facts a profile must match: model type, layers, heads, head size.

    Args:
        config: A transformers config (a multimodal config is reduced to its text config).
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
    }


def describe_architecture(fp: dict[str, Any]) -> str:
    """One line naming a fingerprint's model type, layers, heads and head size."""
    return (
        f"{fp['model_type']} ({fp['num_hidden_layers']} layers, {fp['num_attention_heads']} "
        f"query / {fp['num_key_value_heads']} key-value heads, head dim {fp['head_dim']})"
    )
