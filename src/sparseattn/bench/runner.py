"""Run one (task sample, method setting) pair: prefill, greedy decode, score, measure."""

from __future__ import annotations

import copy
import platform
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import cache_nbytes
from ..compat import cache_kwargs, output_cache
from ..integration.hf import sparse_attention
from ..integration.options import HookOptions
from ..integration.stats import per_token_seconds, timed
from ..setting import Setting
from ..types import Phase
from .peak import PeakMemory

FIDELITY_POSITIONS = 256  # next-token distributions compared over the last positions of the text
# a setting that changes decode steps (a decode method, an eviction policy, activation sparsity)
# is compared over this many last positions, each one a decode step of its own
FIDELITY_DECODE_POSITIONS = 32


def versions() -> dict[str, str]:
    import transformers

    from ..version import __version__

    return {
        "sparseattn": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


@dataclass
class Prefilled:
    """A prompt's prefill: what decoding (and the answer likelihood) starts from.

    Attributes:
        cache: The cache after the prompt.
        logprobs: (V,) log-probabilities of the first generated token.
        prefill_s: Seconds the prefill took.
        peak_mb: Peak memory of the prefill (set by the caller that measured it).
    """

    cache: Any
    logprobs: torch.Tensor
    prefill_s: float
    peak_mb: float | None = None

    @property
    def next_id(self) -> torch.Tensor:
        return self.logprobs.argmax(-1, keepdim=True)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, chunk: int | None = None) -> Prefilled:
    """Run the prompt ``ids`` (1, L), timed; the cache is what the first forward supplies.

    With ``chunk`` the prompt goes in forwards of ``chunk`` tokens over one cache (chunked
    prefill: an eviction policy compresses after every chunk, so memory stays at its budget
    plus one chunk), as ``generate(..., prefill_chunk_size=chunk)`` feeds it.
    """
    start = timed(ids.device)
    out = chunked_forward(model, ids, chunk)
    prefill_s = timed(ids.device) - start
    logprobs = torch.log_softmax(out.logits[0, -1].float(), -1)
    return Prefilled(output_cache(out), logprobs, prefill_s)


def chunked_forward(model, ids: torch.Tensor, chunk: int | None = None, cache: Any = None):
    """The model's output for the last token of ``ids`` (B, L), the prompt fed ``chunk`` tokens
    per forward over one cache (the whole prompt at once when ``chunk`` is None)."""
    step = ids.shape[1] if chunk is None else chunk
    out = None
    for start in range(0, ids.shape[1], step):
        part = ids[:, start : start + step]
        kwargs = {} if cache is None else cache_kwargs(model, cache)
        out = model(input_ids=part, **kwargs, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
    return out


@torch.inference_mode()
def generate_answer(
    model, prefilled: Prefilled, cache: Any, max_new_tokens: int, eos_ids: set[int]
) -> dict[str, Any]:
    """Greedy decode from ``prefilled`` over ``cache`` (its cache or a copy), timed per token.

    Inside ``sparse_attention`` the cache is the library's own, so eviction policies act and
    ``kv_bytes`` is what that setting holds.
    """
    device = prefilled.logprobs.device
    tokens: list[int] = []
    next_id = prefilled.next_id
    times: list[float] = []  # seconds of each forward after the prefill
    while int(next_id) not in eos_ids:  # the harness reads each token; the library does not
        tokens.append(int(next_id))
        if len(tokens) == max_new_tokens:
            break
        start = timed(device)
        out = model(input_ids=next_id[:, None], **cache_kwargs(model, cache), use_cache=True)
        next_id = out.logits[:, -1].argmax(-1)
        times.append(timed(device) - start)
    return {
        "tokens": tokens,
        "prefill_s": prefilled.prefill_s,
        "decode_s_per_token": per_token_seconds(times),
        "kv_bytes": cache_nbytes(cache),
    }


@torch.inference_mode()
def answer_logprob(model, prefilled: Prefilled, cache: Any, answer: list[int]) -> float | None:
    """Teacher-forced log-likelihood (nats) of ``answer`` after the prompt: the first token
    from the prefill's distribution, each next one from a decode step over ``cache`` (the real
    decode path of the setting: its selection and its eviction)."""
    if not answer:
        return None
    total = float(prefilled.logprobs[answer[0]])
    device = prefilled.logprobs.device
    for token, following in zip(answer, answer[1:]):
        ids = torch.tensor([[token]], device=device)
        out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        total += float(torch.log_softmax(out.logits[0, -1].float(), -1)[following])
    return total


@torch.inference_mode()
def decode_logprobs(
    model, prefilled: Prefilled, cache: Any, forced: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Log-probabilities (n, V) of the prefill's next token and of one decode step per token of
    ``forced`` (1, n - 1) teacher-forced over ``cache``, and the seconds per decode step."""
    rows, times = [prefilled.logprobs], []
    for k in range(forced.shape[1]):
        start = timed(forced.device)
        out = model(input_ids=forced[:, k : k + 1], **cache_kwargs(model, cache), use_cache=True)
        rows.append(torch.log_softmax(out.logits[0, -1].float(), -1))
        times.append(timed(forced.device) - start)
    return torch.stack(rows), per_token_seconds(times)


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

    def __init__(
        self, model, tokenizer, sample, options: HookOptions, reuse_prefill: bool = True
    ) -> None:
        self.model, self.tokenizer, self.sample = model, tokenizer, sample
        self.options = options
        self.reuse_prefill = reuse_prefill
        self.device = next(model.parameters()).device
        self.ids = torch.tensor([sample.input_ids], device=self.device)
        self._dense_logprobs: torch.Tensor | None = None
        self._dense_logprobs_s = 0.0
        self._dense_prefill: dict[int, Prefilled] = {}  # prompt length: its dense prefill

    def prefills_densely(self, setting: Setting) -> bool:
        """True when ``setting`` runs the prompt exactly as dense does (a dense or decode-only
        prefill method; no eviction policy, or one that neither scores the prompt's queries nor
        changes its attention), so its decode can start from dense's prefilled cache: the
        setting's cache takes that cache over and keeps what the policy keeps of it."""
        method, policy = setting.parts[0], setting.parts[2]
        keeps_prefill = policy is None or not (policy.needs_queries or policy.changes_prefill)
        return keeps_prefill and setting.chunk is None and (
            setting.prefill.name == "dense" or not (method.phases & {Phase.PREFILL})
        )

    def decodes_sparsely(self, setting: Setting) -> bool:
        """True when ``setting`` changes decode steps: a decode method, an eviction policy or
        an activation sparsity method (all of which act on decode steps only or mostly)."""
        _, method, policy = setting.parts
        decode_method = method.name != "dense" and Phase.DECODE in method.phases
        return decode_method or policy is not None or setting.activation is not None

    def _prefilled(self, length: int | None = None) -> Prefilled:
        """The dense prefill of this sample's first ``length`` tokens (all by default), run
        once (through the hook, as dense runs it)."""
        length = self.ids.shape[1] if length is None else length
        if length not in self._dense_prefill:
            with (
                PeakMemory(self.device) as peak,
                sparse_attention(self.model, "dense", **self.options.kwargs()),
            ):
                done = prefill(self.model, self.ids[:, :length])
            done.peak_mb = peak.peak_mb
            self._dense_prefill[length] = done
        return self._dense_prefill[length]

    @property
    def is_fidelity(self) -> bool:
        return self.sample.meta.get("kind") == "fidelity"

    def _dense_reference(self) -> torch.Tensor:
        if self._dense_logprobs is None:
            self._dense_logprobs, self._dense_logprobs_s = last_logprobs(
                self.model, self.ids, self._positions()
            )
        return self._dense_logprobs

    def _eos_ids(self) -> set[int]:
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids = configured if isinstance(configured, list) else [configured]
        return {i for i in [self.tokenizer.eos_token_id, *ids] if i is not None}

    def _positions(self) -> int:
        return min(FIDELITY_POSITIONS, self.ids.shape[1] - 1)

    def answer_ids(self) -> list[int]:
        """The reference answer as tokens (references joined by ', '), what the answer
        likelihood scores right after the prompt."""
        text = ", ".join(self.sample.references)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def run(self, setting: Setting, task) -> dict[str, Any]:
        """Record fields measured for ``setting`` (everything but the identifying ones).

        A setting that runs the prompt exactly as dense does (``prefills_densely``) starts from
        this sample's one dense prefill when ``reuse_prefill``: its prefill seconds and peak
        are that prefill's, its decode runs on a copy of that cache, and the record says so
        (``prefill_reused``). Besides the generated answer, the teacher-forced log-likelihood
        of the reference answer (``answer_logprob``) goes through the same prefill and decode
        path. Peak memory is the prefill's and the generation's; the copy of the prompt's cache
        kept for the likelihood (or the shared dense prefill) is not counted.
        """
        if self.is_fidelity:
            return self._run_fidelity(setting)
        reuse = self.reuse_prefill and self.prefills_densely(setting)
        shared = self._prefilled() if reuse else None  # before the block: it runs under dense
        answer_ids = self.answer_ids()
        with sparse_attention(
            self.model, **setting.hook_kwargs(), **self.options.kwargs()
        ) as stats:
            with PeakMemory(self.device) as peak:
                own = shared if shared is not None else prefill(self.model, self.ids, setting.chunk)
                cache = copy.deepcopy(own.cache) if shared is not None else own.cache
                spare = copy.deepcopy(own.cache) if shared is None and answer_ids else None
                result = generate_answer(
                    self.model, own, cache, self.sample.max_new_tokens, self._eos_ids()
                )
            densities = stats.density("prefill"), stats.density("decode")
            kept = shared.cache if shared is not None else spare
            kept_mb = cache_nbytes(kept) / 2**20 if kept is not None else 0.0
            del cache
            fresh = spare if spare is not None else copy.deepcopy(own.cache)
            logprob = answer_logprob(self.model, own, fresh, answer_ids)
        answer = self.tokenizer.decode(result["tokens"], skip_special_tokens=True)
        peak_mb = None if peak.peak_mb is None else peak.peak_mb - kept_mb
        if shared is not None and shared.peak_mb is not None and peak_mb is not None:
            peak_mb = max(peak_mb, shared.peak_mb)
        return {
            "score": float(task.score(answer, list(self.sample.references))),
            "answer_logprob": logprob,
            "prefill_density": 1.0 if reuse else densities[0],
            "decode_density": densities[1],
            "prefill_s": result["prefill_s"],
            "decode_s_per_token": result["decode_s_per_token"],
            "kv_bytes": result["kv_bytes"],
            "peak_memory_mb": peak_mb,
            "peak_memory_method": peak.method,
            "prefill_reused": reuse,
            "answer": answer,
            "extra": {},
        }

    def _run_fidelity(self, setting: Setting) -> dict[str, Any]:
        """The label-free task: next-token distributions of the prompt's last positions against
        dense's (a setting whose prefill is dense's reuses dense's, exactly). A setting that
        changes decode steps is compared on decode steps (``_run_decode_fidelity``)."""
        if self.decodes_sparsely(setting):
            return self._run_decode_fidelity(setting)
        reuse = self.reuse_prefill and self.prefills_densely(setting)
        dense = self._dense_reference()  # outside the setting's block, as for every setting
        with (
            sparse_attention(self.model, **setting.hook_kwargs(), **self.options.kwargs()) as stats,
            PeakMemory(self.device) as peak,
        ):
            if reuse:
                logprobs, prefill_s = dense, self._dense_logprobs_s
            else:
                logprobs, prefill_s = last_logprobs(self.model, self.ids, self._positions())
        targets = self.ids[0, -self._positions() :]
        extra = fidelity_scores(dense, logprobs, targets)
        return {
            "score": float(torch.tensor(-extra["kl"]).exp()),
            "answer_logprob": None,
            "prefill_density": 1.0 if reuse else stats.density("prefill"),
            "decode_density": None,
            "prefill_s": prefill_s,
            "decode_s_per_token": None,
            "kv_bytes": None,
            "peak_memory_mb": None if reuse else peak.peak_mb,  # reused: nothing ran
            "peak_memory_method": peak.method,
            "prefill_reused": reuse,
            "answer": "",
            "extra": {**extra, "fidelity_mode": "prefill", "positions": self._positions()},
        }

    def _run_decode_fidelity(self, setting: Setting) -> dict[str, Any]:
        """Fidelity of a setting that changes decode steps: the prompt less its last n tokens is
        prefilled (dense's prefill of it reused when the setting's prefill is dense's), then
        the last n - 1 tokens are teacher-forced one decode step each through the setting's
        decode path (its selection, its eviction, its activation sparsity); the n next-token
        distributions are compared with dense's over the same positions."""
        n = min(FIDELITY_DECODE_POSITIONS, self._positions())
        dense = self._dense_reference()[-n:]
        head, forced = self.ids.shape[1] - n, self.ids[:, -n:-1]
        reuse = self.reuse_prefill and self.prefills_densely(setting)
        shared = self._prefilled(head) if reuse else None
        with (
            sparse_attention(self.model, **setting.hook_kwargs(), **self.options.kwargs()) as stats,
            PeakMemory(self.device) as peak,
        ):
            own = shared if shared is not None else prefill(self.model, self.ids[:, :head])
            cache = copy.deepcopy(own.cache) if shared is not None else own.cache
            logprobs, step_s = decode_logprobs(self.model, own, cache, forced)
            kv_bytes = cache_nbytes(cache)
            del cache
        targets = self.ids[0, -n:]
        extra = fidelity_scores(dense, logprobs, targets)
        return {
            "score": float(torch.tensor(-extra["kl"]).exp()),
            "answer_logprob": None,
            "prefill_density": 1.0 if reuse else stats.density("prefill"),
            "decode_density": stats.density("decode"),
            "prefill_s": own.prefill_s,
            "decode_s_per_token": step_s,
            "kv_bytes": kv_bytes,
            "peak_memory_mb": peak.peak_mb,
            "peak_memory_method": peak.method,
            "prefill_reused": reuse,
            "answer": "",
            "extra": {**extra, "fidelity_mode": "decode", "positions": n},
        }
