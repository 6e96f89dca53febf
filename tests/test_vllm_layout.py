"""The vLLM plugin's pure half (no vLLM import): vLLM's paged cache as per-sequence tensors,
the plugin's configuration, and sparse attention over a hand-built paged batch against
sparseattn's own path (the method's selection on contiguous keys, run by the reference
backend)."""

from __future__ import annotations

import pytest
import torch
from test_contract import NEEDS

from sparseattn.backends import reference_attend
from sparseattn.backends.masks import BlockLayout
from sparseattn.errors import UsageError
from sparseattn.methods.decode.quest import page_bounds
from sparseattn.registry import METHODS, list_methods
from sparseattn.types import AttentionContext, DecodeView, Phase
from sparseattn.vllm.config import SETTING_ENV, check_block_size, plugin_config
from sparseattn.vllm.layout import (
    BatchLayout,
    cache_views,
    channel_major,
    gather_pages,
    gather_sequence,
    page_slots,
    sequence_slots,
    touched_pages,
    write_slots,
)
from sparseattn.vllm.paged import LayerRunner, LayerShape

torch.set_grad_enabled(False)

BS = 16  # vLLM block size of the hand-built caches
# every registered prefill method but dense (which vLLM runs itself)
PREFILL_METHODS = [n for n in list_methods() if Phase.PREFILL in METHODS[n].phases and n != "dense"]
HQ, HKV, D = 4, 2, 16


# -- layout ------------------------------------------------------------------------------


def test_batch_layout_tells_prefill_chunks_and_decodes_apart():
    # a decode, a first prompt, a later chunk, a 1-token prompt
    layout = BatchLayout(query_start=(0, 1, 6, 9, 10), seq_lens=(8, 5, 12, 1))
    assert layout.q_lens == (1, 5, 3, 1)
    assert layout.q_offsets == (7, 0, 9, 0)
    assert layout.decodes == (0,)
    assert layout.prefills == (1, 2, 3)
    assert layout.token_index([2, 0]) == [6, 7, 8, 0]
    with pytest.raises(ValueError, match="seq_len"):
        BatchLayout(query_start=(0, 6), seq_lens=(5,))


def labelled_cache(blocks=5, bs=4, heads=2, d=3) -> torch.Tensor:
    """(nb, Hkv, bs, D) whose entry [b, h, o, :] is b * 100 + h * 10 + o (every d the same)."""
    b = torch.arange(blocks)[:, None, None] * 100
    h = torch.arange(heads)[None, :, None] * 10
    o = torch.arange(bs)[None, None, :]
    return (b + h + o).float()[..., None].expand(-1, -1, -1, d).contiguous()


def test_sequence_slots_and_gather_follow_the_block_table_by_hand():
    cache = labelled_cache()
    row = torch.tensor([3, 0, 2, 4])
    assert sequence_slots(row, 2, 10, 4).tolist() == [14, 15, 0, 1, 2, 3, 8, 9]
    keys = gather_sequence(cache, row, 10)  # (1, Hkv, 10, D)
    want_h0 = [300, 301, 302, 303, 0, 1, 2, 3, 200, 201]
    assert keys.shape == (1, 2, 10, 3)
    assert keys[0, 0, :, 0].tolist() == want_h0
    assert keys[0, 1, :, 0].tolist() == [x + 10 for x in want_h0]


def test_page_and_slot_gathers_by_hand():
    cache = labelled_cache(bs=4)
    table = torch.tensor([[3, 0, 2]])
    # logical pages of 2 tokens: page 1 -> block 3 offset 2; page 3 -> block 0 offset 2
    first = page_slots(table, torch.tensor([[[1, 3]]]), block_size=4, page_size=2)
    assert first.tolist() == [[[14, 2]]]
    pages = gather_pages(cache, first.expand(1, 2, 2), torch.arange(2), 2)  # (1, 2, 4, D)
    assert pages[0, 0, :, 0].tolist() == [302, 303, 2, 3]
    assert pages[0, 1, :, 0].tolist() == [312, 313, 12, 13]
    tokens = gather_pages(cache, torch.tensor([[[5, 9]]]), torch.tensor([1]), 1)
    assert tokens[0, 0, :, 0].tolist() == [111, 211]


def test_cache_views_follow_vllm_cpu_layout_by_hand():
    """One (nb, Hkv, bs, 2D) buffer: per (block, head) bs rows of D for keys, then bs rows of
    D for values; keys transposed (channel-major) under the vec kernels."""
    nb, H, bs, D = 3, 2, 4, 2
    buffer = torch.zeros(nb, H, bs, 2 * D)
    keys, values = cache_views(buffer, key_channel_major=True)
    assert channel_major(keys) and not channel_major(values)
    keys[2, 1, 1, 0] = 7.0  # token 1, channel 0: element 0 * bs + 1 of the keys' rows
    values[2, 1, 3, 1] = 9.0  # token 3, channel 1: row 3 of the values, after bs key rows
    raw = buffer.view(nb, H, 2 * bs, D)[2, 1].flatten()
    assert raw.nonzero().flatten().tolist() == [0 * bs + 1, (bs + 3) * D + 1]
    plain_keys, _ = cache_views(buffer, key_channel_major=False)  # token-major reading
    assert plain_keys[2, 1, 0, 1] == 7.0


@pytest.mark.parametrize("key_channel_major", [True, False])
def test_gathers_read_vllm_caches_in_place(key_channel_major):
    """The gathers read vLLM's strided key and value views as they read a contiguous copy."""
    g = torch.Generator().manual_seed(1)
    buffer = torch.randn(6, 2, 8, 2 * 4, generator=g)  # (nb, Hkv, bs, 2D)
    keys, values = cache_views(buffer, key_channel_major)
    heads = torch.tensor([1, 0])
    for view in (keys, values):
        plain = view.contiguous()
        for P in (1, 2, 4, 8):
            first = torch.randint(0, 48 // P, (3, 2, 5), generator=g) * P
            got = gather_pages(view, first, heads, P)
            assert torch.equal(got, gather_pages(plain, first, heads, P))
        row = torch.tensor([5, 2, 0])
        assert torch.equal(gather_sequence(view, row, 20), gather_sequence(plain, row, 20))
    # and by hand: token 3 of block 2, head 1
    one = torch.tensor([[[19]]])
    assert torch.equal(gather_pages(keys, one, heads[:1], 1)[0, 0, 0], keys[2, 1, 3])
    assert torch.equal(gather_pages(values, one, heads[:1], 1)[0, 0, 0], values[2, 1, 3])


def test_written_sequences_read_back_exactly():
    """Random block tables: what write_slots puts in is what gather_sequence reads out."""
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(12, HKV, 4, D, generator=g)  # garbage in every free slot
    perm = torch.randperm(12, generator=g)
    table = torch.stack([perm[:5], perm[5:10]])
    keys = [torch.randn(HKV, n, D, generator=g) for n in (17, 9)]
    for i, k in enumerate(keys):
        slots = sequence_slots(table[i], 0, k.shape[1], 4)
        write_slots(cache, slots, k.transpose(0, 1))
    for i, k in enumerate(keys):
        assert torch.equal(gather_sequence(cache, table[i], k.shape[1])[0], k)


def test_touched_pages_by_hand():
    layout = BatchLayout(query_start=(0, 9, 10), seq_lens=(14, 21))
    seqs, pages, fill = touched_pages(layout, 4)
    # sequence 0 wrote positions 5..13: pages 1, 2, 3 (the last holds 2); 1 wrote 20: page 5
    assert (seqs, pages, fill) == ([0, 0, 0, 1], [1, 2, 3, 5], [4, 4, 2, 1])


# -- configuration -----------------------------------------------------------------------


def test_no_setting_delegates_and_the_additional_config_wins():
    assert not plugin_config({}, {}).active
    assert not plugin_config({}, {SETTING_ENV: "dense"}).active
    env = {SETTING_ENV: "prefill=xattention[threshold=0.9];decode=quest[budget=512]"}
    config = plugin_config(None, env)
    assert config.active and config.setting.decode.knobs == {"budget": 512}
    assert "xattention" in config.describe() and "quest" in config.describe()
    config = plugin_config({"sparseattn": {"setting": "tri_shape", "min_length": 0}}, env)
    assert config.setting.prefill.name == "tri_shape" and config.min_length == 0


@pytest.mark.parametrize(
    "setting, named",
    [
        ("prefill=xattention;evict=snapkv", "snapkv"),
        ("decode=quest;evict=duo", "head-level policy 'duo'"),
        ("decode=tokenselect", "tokenselect"),
        ("decode=quest[per_query_head=True]", "per_query_head"),
        ("prefill=xattention;chunk=512", "chunk=512"),
        ("decode=quest[budget=7]", "budget"),
        ("prefill=nosuch", "nosuch"),
    ],
)
def test_unsupported_settings_are_refused_by_name(setting, named):
    with pytest.raises(UsageError, match=named.replace("[", r"\[")):
        plugin_config({"sparseattn": setting})


def test_bad_options_are_refused_by_name():
    with pytest.raises(UsageError, match="bogus"):
        plugin_config({"sparseattn": {"setting": "quest", "bogus": 1}})
    with pytest.raises(UsageError, match="min_length"):
        plugin_config({"sparseattn": {"setting": "quest", "min_length": -1}})


# -- sparse attention over a paged batch vs sparseattn's own path ---------------------------


class PagedBatch:
    """Sequences of different lengths written at random blocks of one cache full of garbage."""

    def __init__(self, lengths: list[int], seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        width = max(-(-n // BS) for n in lengths) + 2  # block-table row width
        blocks = len(lengths) * width + 8  # 8 blocks nobody holds
        # vLLM 0.32's CPU layout: one (nb, Hkv, bs, 2D) buffer whose halves are K and V; junk
        # everywhere (stale tokens of earlier requests)
        buffer = torch.randn(blocks, HKV, BS, 2 * D, generator=g) * 5
        self.k_cache, self.v_cache = cache_views(buffer, key_channel_major=True)
        perm = torch.randperm(blocks, generator=g)
        self.table = torch.stack([perm[i * width : (i + 1) * width] for i in range(len(lengths))])
        self.keys = [torch.randn(1, HKV, 0, D) for _ in lengths]
        self.values = [torch.randn(1, HKV, 0, D) for _ in lengths]
        self.g = g

    def append(self, counts: list[int]) -> tuple[torch.Tensor, BatchLayout]:
        """Write ``counts[i]`` new tokens to sequence i (as vLLM does before attention);
        returns their queries (T, Hq, D) and the step's layout."""
        starts, lens, queries = [0], [], []
        for i, n in enumerate(counts):
            k = torch.randn(1, HKV, n, D, generator=self.g)
            v = torch.randn(1, HKV, n, D, generator=self.g)
            held = self.keys[i].shape[2]
            slots = sequence_slots(self.table[i], held, held + n, BS)
            write_slots(self.k_cache, slots, k[0].transpose(0, 1))
            write_slots(self.v_cache, slots, v[0].transpose(0, 1))
            self.keys[i] = torch.cat([self.keys[i], k], 2)
            self.values[i] = torch.cat([self.values[i], v], 2)
            queries.append(torch.randn(n, HQ, D, generator=self.g))
            starts.append(starts[-1] + n)
            lens.append(held + n)
        return torch.cat(queries), BatchLayout(tuple(starts), tuple(lens))


def oracle(method, layout: BatchLayout, batch: PagedBatch, query: torch.Tensor, i: int, shape):
    """Sequence i's output through sparseattn's own path: the method's selection on its
    contiguous keys (a fresh decode view: Quest builds its bounds from the keys), executed by
    the reference backend. Returns (Lq, Hq, D)."""
    start, stop = layout.query_start[i], layout.query_start[i + 1]
    q = query[start:stop].transpose(0, 1)[None]  # (1, Hq, Lq, D)
    k, v = batch.keys[i], batch.values[i]
    decode = layout.is_decode(i)
    ctx = AttentionContext(
        layer_idx=shape.layer_idx,
        phase=Phase.DECODE
        if decode
        else Phase.PREFILL
        if layout.q_offsets[i] == 0
        else Phase.CHUNKED_PREFILL,
        batch=1,
        q_len=stop - start,
        kv_len=k.shape[2],
        q_offset=layout.q_offsets[i],
        kv_offset=0,
        num_q_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        scaling=shape.scaling,
    )
    if decode:
        selection = method.select_decode(q, DecodeView(k), ctx)
    else:
        selection = method.select(q, k, ctx, BlockLayout(ctx, method.block_size))
    return reference_attend(q, k, v, selection, ctx)[0]


def run_step(runner: LayerRunner, batch: PagedBatch, query, layout) -> tuple[torch.Tensor, list]:
    output = torch.full_like(query, float("nan"))
    runner.after_write(batch.k_cache, batch.table, layout)
    plan = runner.plan(layout)
    if plan.prefill:
        runner.prefill(
            query, batch.k_cache, batch.v_cache, batch.table, layout, plan.prefill, output
        )
    if plan.decode:
        runner.decode(query, batch.k_cache, batch.v_cache, batch.table, layout, plan, output)
    return output, plan.sparse


PREFILL = {
    "xattention": "xattention[threshold=0.8,block_size=16,stride=4]",
    "tri_shape": "tri_shape[sink=16,window=32,last_queries=16,block_size=16]",
    "strided": "strided[stride=2,sink=16,window=16,block_size=16]",
    "flexprefill": "flexprefill[gamma=0.5,min_budget=16,block_size=16]",
}


@pytest.mark.parametrize("name", sorted(PREFILL))
def test_paged_prefill_and_chunks_equal_the_contiguous_path(name):
    """A batch of prompts of different lengths, then later chunks, through the paged path,
    equals each sequence's method selection on its contiguous keys (reference backend)."""
    config = plugin_config({"sparseattn": {"setting": f"prefill={PREFILL[name]}", "min_length": 0}})
    shape = LayerShape(2, HQ, HKV, D, D**-0.5, BS)
    runner = LayerRunner(config, shape)
    method = runner.prefill_method
    batch = PagedBatch([150, 70, 113])
    for counts in ([90, 70, 113], [60, 0, 0]):  # prompts, then the rest of the first as a chunk
        query, layout = batch.append(counts)
        output, sparse = run_step(runner, batch, query, layout)
        assert sparse == [i for i, n in enumerate(counts) if n]
        for i in sparse:
            want = oracle(method, layout, batch, query, i, shape)
            got = output[layout.query_start[i] : layout.query_start[i + 1]]
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert 0 < runner.counters.density("prefill") < 1


@pytest.mark.parametrize("name", PREFILL_METHODS)
def test_every_prefill_method_runs_on_the_paged_layout(name):
    """The contract for every registered prefill method (new ones are covered by being
    registered): prompts and a later chunk through the paged path equal the method's own
    selection on contiguous keys."""
    knobs = ",".join(f"{k}={v}" for k, v in {"block_size": 32, **NEEDS.get(name, {})}.items())
    setting = f"prefill={name}[{knobs}]"  # the contract's knobs (its profiles cover layer 0)
    config = plugin_config({"sparseattn": {"setting": setting, "min_length": 0}})
    shape = LayerShape(0, HQ, HKV, D, D**-0.5, BS)
    runner = LayerRunner(config, shape)
    batch = PagedBatch([200, 96], seed=3)
    for counts in ([140, 96], [60, 0]):
        query, layout = batch.append(counts)
        output, sparse = run_step(runner, batch, query, layout)
        assert sparse == [i for i, n in enumerate(counts) if n]
        for i in sparse:
            want = oracle(runner.prefill_method, layout, batch, query, i, shape)
            got = output[layout.query_start[i] : layout.query_start[i + 1]]
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


DECODE = {
    "quest": "quest[budget=48,block_size=8,full_layers=0]",
    "streaming": "streaming[sink=16,window=32,block_size=16]",
    "strided": "strided[stride=3,sink=16,window=16,block_size=16]",
}


@pytest.mark.parametrize("name", sorted(DECODE))
def test_paged_decode_batches_equal_the_contiguous_path(name):
    """Prompts of different lengths, then decode steps of the whole batch (a prompt joining
    midway): every sparse decode row equals the method's own selection on contiguous keys;
    Quest's bounds, kept per cache page, equal bounds rebuilt from the keys."""
    config = plugin_config({"sparseattn": {"setting": f"decode={DECODE[name]}", "min_length": 0}})
    shape = LayerShape(0, HQ, HKV, D, D**-0.5, BS)
    runner = LayerRunner(config, shape)
    method = runner.decode_method
    batch = PagedBatch([120, 75, 160, 40])
    decoded = 0
    for step, counts in enumerate([[100, 75, 0, 0], [1, 1, 97, 0], [1, 1, 1, 40], [1, 1, 1, 1]]):
        query, layout = batch.append(counts)
        output, _ = run_step(runner, batch, query, layout)
        plan_decode = runner.plan(layout).decode
        decoded += len(plan_decode)
        for i in plan_decode:
            want = oracle(method, layout, batch, query, i, shape)
            got = output[layout.query_start[i] : layout.query_start[i + 1]]
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        if name == "quest":
            check_bounds(runner, batch, method.block_size)
    assert decoded >= 6  # several sequences of different lengths decoded sparse
    assert runner.counters.density("decode") < 1


def check_bounds(runner: LayerRunner, batch: PagedBatch, P: int) -> None:
    """Every held page's kept bounds equal Quest's own bounds of the contiguous keys."""
    for i, keys in enumerate(batch.keys):
        n = keys.shape[2]
        if n == 0:
            continue
        low, high = page_bounds(keys, P)  # (1, Hkv, nP, D)
        pages = torch.arange(-(-n // P))[None, None]
        first = page_slots(batch.table[i : i + 1], pages, BS, P)[0, 0]  # (nP,)
        kept = runner.bounds.bounds[first // P]  # (nP, Hkv, 2D)
        assert torch.equal(kept[..., :D].transpose(0, 1), high[0])
        assert torch.equal(kept[..., D:].transpose(0, 1), low[0])


def test_short_calls_and_dense_layers_stay_with_vllm():
    config = plugin_config({"sparseattn": {"setting": "decode=quest[budget=48,block_size=8]"}})
    shape = LayerShape(5, HQ, HKV, D, D**-0.5, BS)
    layout = BatchLayout((0, 1, 2), (2000, 300))
    assert LayerRunner(config, shape).plan(layout).decode == [0]  # 300 < min_length 1024
    early = LayerRunner(config, LayerShape(1, HQ, HKV, D, D**-0.5, BS))
    assert not early.active  # quest keeps its first two layers dense


def test_quest_pages_must_divide_the_vllm_block():
    config = plugin_config({"sparseattn": "decode=quest[block_size=64]"})
    check_block_size(config, 128)
    with pytest.raises(
        UsageError, match=r"block_size=64 must divide .* 32; allowed here: \[8, 16, 32\]"
    ):
        check_block_size(config, 32)
