"""Run one (task sample, method setting) pair: prefill, greedy decode, score, measure."""

from __future__ import annotations

import platform
from typing import Any

import torch

from ..cache import cache_nbytes
from ..integration.hf import sparse_attention
from ..integration.plan import HookOptions
from ..integration.stats import timed
from ..setting import Setting
from .peak import PeakMemory

FIDELITY_POSITIONS = 256  # next-token distributions compared over the last positions of the text


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {
        "sparseattn": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


@torch.inference_mode()
def generate_answer(
    model, ids: torch.Tensor, max_new_tokens: int, eos_ids: set[int]
) -> dict[str, Any]:
    """Greedy decode with separate prefill and per-token timing. ``ids``: (1, L).

    The cache is whatever the model's forward supplies: inside ``sparse_attention`` the
    library's own, so eviction policies act and ``kv_bytes`` is what that setting holds.
    """
    device = ids.device
    start = timed(device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    prefill_s = timed(device) - start
    cache = out.past_key_values
    tokens: list[int] = []
    next_id = out.logits[:, -1].argmax(-1)
    steps = 0  # forward passes after the prefill
    start = timed(device)
    while int(next_id) not in eos_ids:  # the harness reads each token; the library does not
        tokens.append(int(next_id))
        if len(tokens) == max_new_tokens:
            break
        out = model(input_ids=next_id[:, None], past_key_values=cache, use_cache=True)
        next_id = out.logits[:, -1].argmax(-1)
        steps += 1
    decode_s = timed(device) - start
    return {
        "tokens": tokens,
        "prefill_s": prefill_s,
        "decode_s_per_token": decode_s / steps if steps else None,
        "kv_bytes": cache_nbytes(cache),
    }


@torch.inference_mode()
def last_logprobs(model, ids: torch.Tensor, positions: int) -> tuple[torch.Tensor, float]:
    """Log-probabilities (positions, V) of the last positions, and the prefill seconds."""
    start = timed(ids.device)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=positions + 1).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1), timed(ids.device) - start


def fidelity_scores(
    dense: torch.Tensor, sparse: torch.Tensor, targets: torch.Tensor
) -> dict[str, float]:
    """KL(dense || sparse) per position (mean), perplexity of each on the actual next tokens."""
    kl = (dense.exp() * (dense - sparse)).sum(-1).mean().item()
    nll_dense = -dense.gather(-1, targets[:, None]).mean().item()
    nll_sparse = -sparse.gather(-1, targets[:, None]).mean().item()
    ppl_dense, ppl_sparse = (
        float(torch.tensor(nll_dense).exp()),
        float(torch.tensor(nll_sparse).exp()),
    )
    return {
        "kl": max(kl, 0.0),
        "ppl_dense": ppl_dense,
        "ppl": ppl_sparse,
        "ppl_ratio": ppl_sparse / ppl_dense,
    }


class SampleRunner:
    """Runs every setting on one generated sample; keeps the dense fidelity reference in memory."""

    def __init__(self, model, tokenizer, sample, options: HookOptions) -> None:
        self.model, self.tokenizer, self.sample = model, tokenizer, sample
        self.options = options
        self.device = next(model.parameters()).device
        self.ids = torch.tensor([sample.input_ids], device=self.device)
        self._dense_logprobs: torch.Tensor | None = None

    @property
    def is_fidelity(self) -> bool:
        return self.sample.meta.get("kind") == "fidelity"

    def _dense_reference(self) -> torch.Tensor:
        if self._dense_logprobs is None:
            self._dense_logprobs, _ = last_logprobs(self.model, self.ids, self._positions())
        return self._dense_logprobs

    def _eos_ids(self) -> set[int]:
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids = configured if isinstance(configured, list) else [configured]
        return {i for i in [self.tokenizer.eos_token_id, *ids] if i is not None}

    def _positions(self) -> int:
        return min(FIDELITY_POSITIONS, self.ids.shape[1] - 1)

    def run(self, setting: Setting, task) -> dict[str, Any]:
        """Record fields measured for ``setting`` (everything but the identifying ones)."""
        with (
            PeakMemory(self.device) as peak,
            sparse_attention(self.model, **setting.hook_kwargs(), **self.options.kwargs()) as stats,
        ):
            if self.is_fidelity:
                logprobs, prefill_s = last_logprobs(self.model, self.ids, self._positions())
                result = {
                    "tokens": [],
                    "prefill_s": prefill_s,
                    "decode_s_per_token": None,
                    "kv_bytes": None,
                }
            else:
                result = generate_answer(
                    self.model, self.ids, self.sample.max_new_tokens, self._eos_ids()
                )
        answer = self.tokenizer.decode(result["tokens"], skip_special_tokens=True)
        extra: dict[str, Any] = {}
        if self.is_fidelity:
            targets = self.ids[0, -self._positions() :]
            extra.update(fidelity_scores(self._dense_reference(), logprobs, targets))
            score = float(torch.tensor(-extra["kl"]).exp())
        else:
            score = float(task.score(answer, list(self.sample.references)))
        return {
            "score": score,
            "prefill_density": stats.density("prefill"),
            "decode_density": stats.density("decode"),
            "prefill_s": result["prefill_s"],
            "decode_s_per_token": result["decode_s_per_token"],
            "kv_bytes": result["kv_bytes"],
            "peak_memory_mb": peak.peak_mb,
            "peak_memory_method": peak.method,
            "answer": answer,
            "extra": extra,
        }
