"""sparseattn as a vLLM attention-backend plugin (docs/vllm.md).

``pip install "sparseattn[vllm]"`` registers ``sparseattn.vllm.plugin:register`` under vLLM's
``vllm.general_plugins`` entry point; every vLLM process runs it before work starts, and it
overrides vLLM's ``CPU_ATTN`` backend with ``backend.SparseCPUAttentionBackend`` through vLLM's
attention-backend registry. The setting comes from ``$SPARSEATTN_SETTING`` or vLLM's
``additional_config={"sparseattn": ...}``; with none, vLLM's own backend runs every call.

Only ``plugin`` and ``backend`` import vLLM; ``config``, ``layout`` and ``paged`` (the
configuration, the paged-cache layout and the sparse execution) import without it.
"""

from .config import CONFIG_KEY, SETTING_ENV, PluginConfig, plugin_config, supported_methods

__all__ = ["CONFIG_KEY", "SETTING_ENV", "PluginConfig", "plugin_config", "supported_methods"]
