"""sparseattn: training-free sparse attention for Hugging Face causal LMs, measured honestly."""

from .cache import SparseCache
from .errors import UsageError
from .integration.hf import last_stats, sparse_attention
from .integration.stats import RunStats

# importing the method modules registers the built-in methods
from .methods import anchor, decode, dhsa, eviction, flexprefill, hip, minference, oracle, pbs, proxyattn, sale, seer, static, xattention  # noqa: F401,E501
from .models import load_model
from .registry import (
    build_method,
    build_policy,
    list_methods,
    list_policies,
    method_info,
    policy_info,
    register_method,
    register_policy,
)
from .types import AttentionContext, BlockSelection, PageSelection, Phase, TokenSelection

from .version import __version__

__all__ = [
    "AttentionContext",
    "BlockSelection",
    "PageSelection",
    "Phase",
    "RunStats",
    "SparseCache",
    "TokenSelection",
    "UsageError",
    "build_method",
    "build_policy",
    "last_stats",
    "list_methods",
    "list_policies",
    "load_model",
    "method_info",
    "policy_info",
    "register_method",
    "register_policy",
    "sparse_attention",
]
