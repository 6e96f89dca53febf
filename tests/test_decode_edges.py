"""Edge cases of the decode engine: sinks under left padding, TokenSelect's fixed width and
host reads, per-step work on evicted layers, GQA groups wider than the page kernel's rows."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, make_model
from syncs import decode_steps
from test_cache import generate
from test_decode_double_sparsity import calibrated
from test_decode_retrieval import CheckedRetrieval
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM, LlamaConfig

import sparseattn
from sparseattn.methods.decode.retrieval import RetrievalAttention
from sparseattn.methods.decode.tokenselect import TokenSelect
from sparseattn.types import AttentionContext, DecodeView, Phase

torch.set_grad_enabled(False)

# -- 1. a row's sink is its first valid positions, not the padding before them --------------

# lengths differ by two pages of 16 (one stride group of 2 pages): pages and tiles of the short
# row line up with its own pages alone, so only the sink's place can make them differ
LENGTHS = [128, 96]
PADDED_SINKS = {
    "streaming": {"method": "streaming", "sink": 8, "window": 16, "block_size": 16},
    "strided": {"method": "strided", "stride": 2, "sink": 8, "window": 16, "block_size": 16},
    "tri_shape": {
        "method": "tri_shape",
        "sink": 8,
        "window": 16,
        "last_queries": 16,
        "block_size": 16,
    },
    "quest": {"decode": "quest", "decode_knobs": {"budget": 48, "sink": 4, "full_layers": 0}},
    "tokenselect": {
        "decode": "tokenselect",
        "decode_knobs": {"budget": 24, "sink": 4, "window": 4},
    },
    "tidaldecode": {
        "decode": "tidaldecode",
        "decode_knobs": {
            "budget": 24,
            "sink": 4,
            "window": 4,
            "full_layers": 0,
            "reselect_layer": -1,
        },
    },
    "delta": {
        "decode": "delta",
        "decode_knobs": {"budget": 24, "sink": 4, "window": 4, "full_layers": 0, "select_every": 2},
    },
    "retrieval_attention": {
        "decode": "retrieval_attention",
        "decode_knobs": {"budget": 24, "sink": 4, "window": 4, "index": "flat"},
    },
    "quest-ring": {
        "decode": "quest",
        "decode_knobs": {"budget": 24, "sink": 4, "block_size": 8, "full_layers": 0},
        "evict": "streaming",
        "evict_knobs": {"sink": 4, "window": 60},
    },
    "tokenselect-ring": {
        "decode": "tokenselect",
        "decode_knobs": {"budget": 24, "sink": 4, "window": 4},
        "evict": "streaming",
        "evict_knobs": {"sink": 4, "window": 56},
    },
}


def assert_rows_run_as_alone(model, setting: dict, lengths=LENGTHS, steps=6, seed=3) -> None:
    """Each row of a left-padded batch generates exactly what it generates alone (greedy
    tokens equal, logits of the prompt and of every step close), through a sparse path."""
    ids, mask = left_padded_batch(lengths, seed=seed)
    width = ids.shape[1]
    with sparseattn.sparse_attention(model, min_length=0, **setting) as stats:
        both = generate(model, ids, mask, steps=steps)
        phase = "prefill" if setting.get("method") == "tri_shape" else "decode"
        assert stats.density(phase) < 1.0  # the sparse path ran
        alone = [
            generate(model, ids[i : i + 1, width - n :], mask[i : i + 1, width - n :], steps)
            for i, n in enumerate(lengths)
        ]
    for row, n in enumerate(lengths):
        assert torch.equal(both.sequences[row, width - n :], alone[row].sequences[0]), row
        torch.testing.assert_close(
            torch.stack(both.logits)[:, row],
            torch.stack(alone[row].logits)[:, 0],
            atol=1e-4,
            rtol=1e-4,
        )


@pytest.mark.parametrize("name", sorted(PADDED_SINKS))
def test_sink_is_each_rows_first_valid_positions_under_left_padding(name):
    """Rows of different lengths, left-padded: every method with a sink (static patterns in
    prefill and decode, decode selections over full and ring caches) runs each row as alone."""
    assert_rows_run_as_alone(make_model("llama"), PADDED_SINKS[name])


@pytest.mark.parametrize("name", ["tokenselect", "quest", "streaming"])
def test_sink_follows_padding_on_sliding_window_layers(name):
    """Gemma 3's sliding layers are rings holding explicit positions (padding emptied): a
    row's sink there comes from the call's padding mask, not from what the ring holds."""
    assert_rows_run_as_alone(make_model("gemma3"), PADDED_SINKS[name])


@pytest.fixture(scope="module")
def channels_profile(tmp_path_factory):
    """A channels profile of the tiny llama, for double_sparsity."""
    return calibrated(make_model("llama"), tmp_path_factory.mktemp("ds") / "llama-channels.json")


def test_double_sparsity_sink_follows_padding(channels_profile):
    knobs = {"budget": 24, "sink": 4, "window": 4, "channels": 4, "profile": channels_profile}
    assert_rows_run_as_alone(
        make_model("llama"), {"decode": "double_sparsity", "decode_knobs": knobs}
    )


# -- 2. TokenSelect: a selection of fixed width, and no host read by default -----------------


def tokenselect_steps(method, steps: int, start: int = 200, batch: int = 2, seed: int = 0):
    """Drive ``method.select_decode`` over ``steps`` decode steps of one layer (one key appended
    per step). Row 0's query never changes; row 1's turns away once at step 2, so from then on
    the rows' reuse phases differ and some row reuses its selection at almost every step.

    Yields each step's selection.
    """
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d = 4, 2, 16
    q = torch.randn(batch, hq, 1, d, generator=g)
    keys = torch.randn(batch, hkv, start + steps, d, generator=g)
    state: dict = {}
    for step in range(steps):
        length = start + step + 1
        query = q.clone()
        if step == 2:
            query[1] = -query[1]
        view = DecodeView(
            keys[:, :, :length], state, writes=step + 1, last_write=(length - 1, length)
        )
        ctx = AttentionContext(
            layer_idx=0,
            phase=Phase.DECODE,
            batch=batch,
            q_len=1,
            kv_len=length,
            q_offset=length - 1,
            kv_offset=0,
            num_q_heads=hq,
            num_kv_heads=hkv,
            scaling=d**-0.5,
        )
        yield method.select_decode(query, view, ctx)


def test_tokenselect_width_is_fixed_when_rows_reuse_out_of_phase():
    """With the selection cache on, every step's selection has the same width, budget plus
    the tokens a reused selection may append (max_reuse), however the rows' reuse interleaves;
    each row reads at most that many tokens and always the current one."""
    method = TokenSelect(budget=32, reuse_threshold=0.9, max_reuse=4)
    widths = set()
    for step, selection in enumerate(tokenselect_steps(method, steps=24)):
        widths.add(selection.indices.shape[-1])
        current = 200 + step
        assert ((selection.indices == current) & selection.valid).any(-1).all()
        assert (selection.valid.sum(-1) <= 32 + 4).all()
    assert widths == {32 + 4}


def test_tokenselect_default_decode_reads_nothing_on_the_host():
    """TokenSelect with its default knobs (only the budget set) decodes with no host sync."""
    model = make_model("llama")
    ids, mask = left_padded_batch([120, 97], seed=6)
    with sparseattn.sparse_attention(
        model, decode="tokenselect", decode_knobs={"budget": 48}, min_length=0
    ):
        run = decode_steps(model, ids, mask, steps=4)
    assert run.syncs == [[]] * 4
    assert 0 < sparseattn.last_stats(model).density("decode") < 0.6


# -- 3. per-step work on evicted layers follows what the layer holds -------------------------


class CountAllocations(TorchDispatchMode):
    """Elements of every tensor an op returns while active, in order."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.sizes.append(tensor.numel())
        return out


def decode_allocations(name: str, prompt: int, evict: dict) -> list[int]:
    """Sizes of the tensors ``name``'s select_decode creates over 4 decode steps after a prompt
    of ``prompt`` tokens (batch of 2, the second row left-padded by 7 tokens)."""
    model = make_model("llama", seed=1)
    roles = {"tidaldecode": {"reselect_layer": -1}, "delta": {"select_every": 2}}[name]
    knobs = dict(budget=12, sink=2, window=2, full_layers=0, **roles)  # layer 1 reuses
    method = sparseattn.build_method(name, **knobs)
    counter = CountAllocations()
    original = method.select_decode

    def measured(q, view, ctx):
        with counter:
            return original(q, view, ctx)

    method.select_decode = measured
    ids, mask = left_padded_batch([prompt, prompt - 7], seed=4)
    with sparseattn.sparse_attention(model, decode=method, min_length=0, **evict):
        generate(model, ids, mask, steps=4)
    return counter.sizes


@pytest.mark.parametrize("name", ["tidaldecode", "delta"])
@pytest.mark.parametrize(
    "evict",
    [
        {"evict": "streaming", "evict_knobs": {"sink": 4, "window": 28}},
        {"evict": "snapkv", "evict_knobs": {"capacity": 24, "window": 8}},
    ],
    ids=["ring", "per-head-compacted"],
)
def test_cross_layer_step_allocates_in_proportion_to_what_the_layer_holds(name, evict):
    """On layers that hold a bounded number of keys (a ring, a per-head compaction) the
    tensors a decode step creates do not grow with the tokens seen: after a prompt 8x longer
    every step creates tensors of the same sizes."""
    short = decode_allocations(name, 64, evict)
    long = decode_allocations(name, 512, evict)
    assert long == short


def count_index_builds(monkeypatch, index: str, evict: dict, steps: int = 12) -> list:
    """Decode with retrieval_attention over a ring cache; returns the index builds by step."""
    builds = []
    build = RetrievalAttention.new_indexes

    def counted(self, count, dim):
        builds.append(count)
        return build(self, count, dim)

    monkeypatch.setattr(RetrievalAttention, "new_indexes", counted)
    model = make_model("llama")
    ids, mask = left_padded_batch([90, 70], seed=2)
    method = CheckedRetrieval(budget=16, sink=2, window=4, index=index)
    method.pad = (0, 20)
    with sparseattn.sparse_attention(
        model, decode=method, min_length=0, evict="streaming", evict_knobs=evict
    ):
        generate(model, ids, mask, steps=steps)
    assert method.steps == (steps - 1) * model.config.num_hidden_layers  # every step checked
    return builds


@pytest.mark.parametrize("rerotate", [False, True], ids=["ring", "ring-rerotated"])
def test_retrieval_replaces_overwritten_ring_slots_in_place(monkeypatch, rerotate):
    """A ring overwrites one slot per step (and moves its sinks' rotation when re-rotating):
    the flat index replaces those slots' vectors and is built once per layer, and after every
    step it holds exactly the ring's keys and answers as an index rebuilt from them
    (``CheckedRetrieval``)."""
    evict = {"sink": 8, "window": 16, "rerotate": rerotate}
    builds = count_index_builds(monkeypatch, "flat", evict)
    assert len(builds) == 2  # one per layer, on the first decode step


def test_retrieval_hnsw_rebuilds_a_ring_only_when_replaced_entries_outnumber_it(monkeypatch):
    """A graph index cannot remove entries: a ring's overwritten slot is added again under its
    id, and the index is rebuilt only once the replaced entries outnumber the held ones (24
    slots here: once in 30 steps per layer), never at every step."""
    builds = count_index_builds(monkeypatch, "hnsw", {"sink": 8, "window": 16}, steps=31)
    assert len(builds) == 2 * 2  # per layer: the first decode step, then after 25 overwrites


# -- 4. GQA groups wider than the C++ page kernel's rows -------------------------------------


def test_page_decode_of_groups_over_16_query_heads_equals_the_reference():
    """34 query heads share one KV head (the C++ page kernel takes at most 16 rows per call):
    Quest's unpadded page reads, run in place, equal dense fp32 attention over its pages."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=136,  # a multiple of the heads, as transformers checks
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=34,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    ids, mask = left_padded_batch([150, 150], seed=8)
    knobs = {"budget": 64, "block_size": 16, "full_layers": 0}
    runs = {}
    for backend in ("gather", "reference"):
        with sparseattn.sparse_attention(
            model, decode="quest", decode_knobs=knobs, min_length=0, decode_backend=backend
        ) as stats:
            runs[backend] = generate(model, ids, mask, steps=6)
        assert 0 < stats.density("decode") < 0.6
    assert torch.equal(runs["gather"].sequences, runs["reference"].sequences)
    torch.testing.assert_close(
        torch.stack(runs["gather"].logits),
        torch.stack(runs["reference"].logits),
        atol=1e-4,
        rtol=1e-4,
    )
