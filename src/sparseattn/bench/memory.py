"""Memory benchmark: a long stream decoded token by token under a setting (StreamingLLM's test),
and the peak memory of a prompt of each length (``run_prompt_memory``).

Every stream record also holds ``peak_added_mb``: the peak resident memory since the stream
started (high-water mark reset at its start) minus the resident size before it.

A long generated text is fed one token per step after a short prompt (teacher forcing, so the
text is the same for every setting). Every ``every`` steps the record holds the cache bytes,
the process's resident memory, the seconds per token of the last steps and the negative
log-likelihood of the tokens since the previous record: under a bounded cache all stay flat
however long the stream runs, while a full cache grows until it leaves the model's context.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from ..cache import cache_nbytes, cache_held_bytes
from ..compat import cache_kwargs, output_cache
from ..integration.hf import sparse_attention
from ..integration.options import HookOptions
from ..integration.stats import timed
from ..setting import Setting
from .peak import PeakMemory, rss_mb
from .prefill import benchmark_input
from .runner import chunked_forward


@torch.inference_mode()
def run_memory_bench(
    model,
    tokenizer,
    setting: Setting,
    tokens: int,
    *,
    prompt: int = 1024,
    every: int = 256,
    options: HookOptions | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Yield one record per ``every`` streamed tokens (and one for the prompt).

    Args:
        setting: The setting to stream under (e.g. ``evict=streaming[rerotate=True]``).
        tokens: Tokens streamed after the prompt.
        prompt: Tokens prefilled first.
        every: Steps per record.
    """
    from tqdm.auto import tqdm

    options = options or HookOptions(min_length=0)
    device = next(model.parameters()).device
    text = benchmark_input(tokenizer, prompt + tokens + 1, seed).to(device)
    with (
        sparse_attention(model, **setting.hook_kwargs(), **options.kwargs()),
        PeakMemory(device) as peak,
    ):
        start = timed(device)
        out = chunked_forward(model, text[:, :prompt], setting.chunk)
        cache = output_cache(out)
        yield _record(setting, prompt, 0, cache, timed(device) - start, None, 0, peak)
        nll, count, start = 0.0, 0, timed(device)
        bar = tqdm(total=tokens, disable=not progress, desc=setting.label, unit="tok")
        for step in range(tokens):
            position = prompt + step
            logits = out.logits[:, -1].float()
            nll -= float(torch.log_softmax(logits, -1)[0, text[0, position]])
            count += 1
            out = model(input_ids=text[:, position : position + 1], **cache_kwargs(model, cache))
            bar.update(1)
            if (step + 1) % every == 0 or step + 1 == tokens:
                elapsed = (timed(device) - start) / count
                yield _record(setting, position + 1, step + 1, cache, elapsed, nll, count, peak)
                nll, count, start = 0.0, 0, timed(device)
        bar.close()


def _record(setting, seen, streamed, cache, seconds, nll, count, peak) -> dict[str, Any]:
    so_far = peak.so_far_mb()
    return {
        "peak_added_mb": None if so_far is None else so_far - (peak.start_mb or 0.0),
        "setting": setting.label,
        "seen_tokens": seen,
        "streamed_tokens": streamed,
        "cache_bytes": cache_nbytes(cache),
        "rss_mb": rss_mb(),
        "s_per_token": seconds,
        "nll": None if nll is None else nll / max(count, 1),
        "ppl": None if nll is None else math.exp(nll / max(count, 1)),
    }


@torch.inference_mode()
def dense_window_nll(model, tokenizer, length: int, every: int, seed: int = 0) -> list[dict]:
    """The dense reference inside the model's context: NLL per ``every`` tokens of the same text
    in one teacher-forced forward (equal to decoding it token by token with a full cache)."""
    device = next(model.parameters()).device
    text = benchmark_input(tokenizer, length + 1, seed).to(device)
    logits = model(input_ids=text[:, :length], use_cache=False).logits[0].float()
    nll = -torch.log_softmax(logits, -1).gather(-1, text[0, 1 : length + 1, None])[:, 0]
    out = []
    for end in range(every, length + 1, every):
        chunk = float(nll[end - every : end].mean())
        out.append({"setting": "dense", "seen_tokens": end, "nll": chunk, "ppl": math.exp(chunk)})
    return out


@torch.inference_mode()
def run_prompt_memory(
    model,
    tokenizer,
    setting: Setting,
    lengths: list[int],
    *,
    new_tokens: int = 8,
    options: HookOptions | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Yield, per prompt length, the memory a setting adds to read the prompt and generate.

    The prompt (fed in ``setting.chunk`` tokens per forward when set) and ``new_tokens`` greedy
    steps run inside one peak-memory scope (``PeakMemory``: the resident high-water mark is
    reset first, so the peak is this run's, not the process's since start). A short prompt
    runs first, outside the scope, so no kernel build or first-call allocation is counted.

    Record: ``peak_added_mb`` (peak during the run minus the resident size before it: the
    cache, the activations of one forward, the method's state), ``kv_bytes`` (what the cache
    allocates after the run, everything counted) and ``kv_held_bytes`` (the keys and values
    of the tokens it holds).
    """
    from tqdm.auto import tqdm

    options = options or HookOptions()
    device = next(model.parameters()).device
    with sparse_attention(model, **setting.hook_kwargs(), **options.kwargs()):
        warm = benchmark_input(tokenizer, 256, seed).to(device)
        _generate(model, warm, setting.chunk and min(setting.chunk, 128), 2)
        for length in tqdm(lengths, disable=not progress, desc=setting.label, unit="prompt"):
            ids = benchmark_input(tokenizer, length, seed).to(device)
            with PeakMemory(device) as peak:
                start = timed(device)
                cache = _generate(model, ids, setting.chunk, new_tokens)
                seconds = timed(device) - start
                kv_bytes, held = cache_nbytes(cache), cache_held_bytes(cache)
            del cache
            yield {
                "setting": setting.label,
                "prompt_tokens": length,
                "chunk": setting.chunk,
                "new_tokens": new_tokens,
                "peak_added_mb": None
                if peak.peak_mb is None
                else peak.peak_mb - (peak.start_mb or 0.0),
                "peak_mb": peak.peak_mb,
                "peak_memory_method": peak.method,
                "kv_bytes": kv_bytes,
                "kv_held_bytes": held,
                "seconds": seconds,
            }


def _generate(model, ids: torch.Tensor, chunk: int | None, steps: int):
    """Prefill ``ids`` (chunked) and take ``steps`` greedy steps; returns the cache."""
    out = chunked_forward(model, ids, chunk)
    cache = output_cache(out)
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return cache
