"""The ``vllm.general_plugins`` entry point: override vLLM's ``CPU_ATTN`` backend.

vLLM runs every general plugin in each of its processes (the front end, the engine core,
every worker) before work starts, possibly more than once: ``register`` is re-entrant. It
changes nothing but one entry of vLLM's attention-backend registry (``register_backend``),
and patches no class.
"""

from __future__ import annotations

import logging

from .config import plugin_config

BACKEND = "sparseattn.vllm.backend.SparseCPUAttentionBackend"
logger = logging.getLogger("vllm.sparseattn")  # under vLLM's logger: shows in the engine log


def register() -> None:
    """Point vLLM's ``CPU_ATTN`` at sparseattn's backend (once per process; idempotent).

    The backend delegates every call to vLLM's own CPU attention unless a setting is given
    (``$SPARSEATTN_SETTING`` or ``additional_config["sparseattn"]``). A malformed or
    unsupported setting in the environment is refused here, by name, before the engine starts.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    config = plugin_config()  # the environment's setting; raises UsageError naming what is wrong
    member = AttentionBackendEnum.CPU_ATTN
    if member.is_overridden() and member.get_path() == BACKEND:
        return
    register_backend(member, BACKEND)
    logger.info("sparseattn: CPU_ATTN -> %s; %s", BACKEND, config.describe())
