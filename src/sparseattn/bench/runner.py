"""Run one (task sample, method setting) pair: prefill, greedy decode, score, measure."""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from ..integration.hf import sparse_attention

FIDELITY_POSITIONS = 256  # next-token distributions compared over the last positions of the text


def labelled(name: str, knobs: dict[str, Any]) -> str:
    """'streaming' or 'streaming[sink=64,window=512]': how records and reports name a setting."""
    if not knobs:
        return name
    return f"{name}[{','.join(f'{k}={v}' for k, v in sorted(knobs.items()))}]"


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: a method with fixed knobs, applied to every phase it supports."""

    method: str
    knobs: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return labelled(self.method, self.knobs)


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {
        "sparseattn": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    """GPU: peak allocated since the last reset. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def kv_cache_mb(cache: DynamicCache) -> float:
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total / 2**20


@torch.inference_mode()
def generate_answer(
    model, ids: torch.Tensor, max_new_tokens: int, eos_ids: set[int]
) -> dict[str, Any]:
    """Greedy decode with separate prefill and per-token timing. ``ids``: (1, L)."""
    device = ids.device
    cache = DynamicCache(config=model.config)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill_s = time.perf_counter() - start
    tokens: list[int] = []
    next_id = out.logits[:, -1].argmax(-1)
    steps = 0  # forward passes after the prefill
    start = time.perf_counter()
    while int(next_id) not in eos_ids:
        tokens.append(int(next_id))
        if len(tokens) == max_new_tokens:
            break
        out = model(input_ids=next_id[:, None], past_key_values=cache, use_cache=True)
        next_id = out.logits[:, -1].argmax(-1)
        steps += 1
    _sync(device)
    decode_s = time.perf_counter() - start
    return {
        "tokens": tokens,
        "prefill_s": prefill_s,
        "decode_s_per_token": decode_s / steps if steps else None,
        "kv_cache_mb": kv_cache_mb(cache),
    }


@torch.inference_mode()
def last_logprobs(model, ids: torch.Tensor, positions: int) -> tuple[torch.Tensor, float]:
    """Log-probabilities (positions, V) of the last positions, and the prefill seconds."""
    _sync(ids.device)
    start = time.perf_counter()
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=positions + 1).logits[0, :-1]
    _sync(ids.device)
    return torch.log_softmax(logits.float(), -1), time.perf_counter() - start


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

    def __init__(self, model, tokenizer, sample, hook_options: dict[str, Any]) -> None:
        self.model, self.tokenizer, self.sample = model, tokenizer, sample
        self.hook_options = hook_options
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
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with sparse_attention(
            self.model, setting.method, **setting.knobs, **self.hook_options
        ) as stats:
            if self.is_fidelity:
                logprobs, prefill_s = last_logprobs(self.model, self.ids, self._positions())
                result = {
                    "tokens": [],
                    "prefill_s": prefill_s,
                    "decode_s_per_token": None,
                    "kv_cache_mb": None,
                }
            else:
                result = generate_answer(
                    self.model, self.ids, self.sample.max_new_tokens, self._eos_ids()
                )
        answer = self.tokenizer.decode(result["tokens"], skip_special_tokens=True)
        extra: dict[str, Any] = {"kv_cache_mb": result["kv_cache_mb"]}
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
            "peak_memory_mb": peak_memory_mb(self.device),
            "answer": answer,
            "extra": extra,
        }
