"""sparseattn: training-free sparse attention for Hugging Face causal LMs, measured honestly."""

from .errors import UsageError
from .integration.hf import last_stats, sparse_attention
from .integration.stats import RunStats

# importing the method modules registers the built-in methods
from .methods import flexprefill, minference, oracle, static, xattention  # noqa: F401
from .models import load_model
from .registry import build_method, list_methods, method_info, register_method
from .types import AttentionContext, BlockSelection, KVSelection, Phase

__version__ = "0.1.0"

__all__ = [
    "AttentionContext",
    "BlockSelection",
    "KVSelection",
    "Phase",
    "RunStats",
    "UsageError",
    "build_method",
    "last_stats",
    "list_methods",
    "load_model",
    "method_info",
    "register_method",
    "sparse_attention",
]
