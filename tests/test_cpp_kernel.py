"""The C++ block-sparse kernel equals the dense fp32 reference on fuzzed selections, builds into
the user cache (never the package), and the hook falls back to flex when it cannot build."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparseattn.backends import BlockLayout, cpp, reference_attend
from sparseattn.backends.masks import base_token_mask
from sparseattn.backends.tiles import attend_tiles, tile_kernel
from sparseattn.errors import UsageError
from sparseattn.types import AttentionContext, BlockSelection, Phase


@pytest.fixture(scope="module")
def kernel():
    """The kernel must build wherever a compiler exists (CI included)."""
    if cpp.compiler() is None:
        pytest.skip("no C++ compiler on this machine: test_fallback_* cover it")
    assert cpp.available(), f"the C++ kernel did not build: {cpp.reason()}"


def fuzz_case(seed: int):
    """A random call: lengths off the tile size, batch with left padding, GQA, windows,
    softcap, chunked prefill, random density, block size, q/k/v layouts as the hook sees them."""
    g = torch.Generator().manual_seed(seed)

    def pick(*options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    block = pick(16, 32, 64)
    hkv = pick(1, 2, 3)
    groups = pick(1, 2, 3)
    hq, d = hkv * groups, pick(8, 16, 32)
    batch = pick(1, 2, 3)
    kv_len = int(torch.randint(block // 2, 5 * block + 7, (1,), generator=g))
    chunked = bool(torch.rand(1, generator=g) < 0.3)
    q_len = (
        int(torch.randint(1 + kv_len // 3, kv_len + 1, (1,), generator=g)) if chunked else kv_len
    )
    window = pick(None, None, int(torch.randint(5, 3 * block, (1,), generator=g)))
    softcap = pick(None, None, 3.0)
    key_valid = None
    if batch > 1 and torch.rand(1, generator=g) < 0.6:
        pad = torch.randint(0, kv_len // 2, (batch,), generator=g)
        pad[0] = 0
        key_valid = torch.arange(kv_len)[None] >= pad[:, None]  # (B, Lk), left padding
    ctx = AttentionContext(
        layer_idx=0,
        phase=Phase.CHUNKED_PREFILL if chunked else Phase.PREFILL,
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        q_offset=kv_len - q_len,
        kv_offset=0,
        num_q_heads=hq,
        num_kv_heads=hkv,
        scaling=d**-0.5,
        sliding_window=window,
        softcap=softcap,
        key_valid=key_valid,
    )
    # q as the model hands it: a transposed view of (B, Lq, Hq, D); k and v views of a longer
    # cache buffer (slots past kv_len hold garbage the kernel must never read)
    q = torch.randn(batch, q_len, hq, d, generator=g).transpose(1, 2)
    slots = kv_len + int(torch.randint(0, 9, (1,), generator=g))
    k = torch.randn(batch, hkv, slots, d, generator=g)[:, :, :kv_len]
    v = torch.randn(batch, hkv, slots, d, generator=g)[:, :, :kv_len]
    layout = BlockLayout(ctx, block)
    density = float(torch.rand(1, generator=g))
    shape = (batch, hq, layout.n_q_blocks, layout.n_kv_blocks)
    raw = torch.rand(shape, generator=g) < density
    if torch.rand(1, generator=g) < 0.5:  # the heads of a group share most tiles (stacked runs)
        shared = torch.rand(batch, hkv, *shape[2:], generator=g) < density
        raw = shared.repeat_interleave(groups, 1) | (torch.rand(shape, generator=g) < 0.1)
    return q, k, v, ctx, layout, layout.finalize(raw)


def valid_rows(ctx):
    return base_token_mask(ctx).any(-1, keepdim=True).transpose(1, 2)  # (B, Lq, 1, 1)


@pytest.mark.parametrize("seed", range(40))
def test_cpp_equals_reference_on_fuzzed_calls(kernel, seed):
    q, k, v, ctx, layout, sel = fuzz_case(seed)
    got = cpp.cpp_attend(q, k, v, sel, ctx, layout)
    expected = reference_attend(q, k, v, sel, ctx)
    rows = valid_rows(ctx).expand_as(got)
    torch.testing.assert_close(got[rows], expected[rows], atol=3e-5, rtol=1e-4)
    # queries that see no key (left padding) are exactly zero, as in the reference
    assert torch.equal(got[~rows], torch.zeros_like(got[~rows]))


@pytest.mark.parametrize("seed", range(3))
def test_flex_equals_reference_on_fuzzed_calls(seed):
    """The fallback kernel on the same fuzzed calls (fewer: each new head layout compiles)."""
    from sparseattn.backends import flex_attend

    q, k, v, ctx, layout, sel = fuzz_case(seed)
    got = flex_attend(q, k, v, sel, ctx, layout)
    expected = reference_attend(q, k, v, sel, ctx)
    rows = valid_rows(ctx).expand_as(got)
    torch.testing.assert_close(got[rows], expected[rows], atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["every_tile", "diagonal_only", "nothing"])
def test_cpp_limits(kernel, which):
    """Every tile (dense through the sparse path), the diagonal alone, and an empty row set."""
    q, k, v, ctx, layout, _ = fuzz_case(7)
    shape = (ctx.batch, ctx.num_q_heads, layout.n_q_blocks, layout.n_kv_blocks)
    raw = torch.zeros(shape, dtype=torch.bool)
    if which == "every_tile":
        sel = layout.every_tile(ctx.num_q_heads)
    elif which == "diagonal_only":
        sel = layout.finalize(raw)
    else:  # no tile at all: every output row is zero
        sel = BlockSelection(raw, layout.block_size)
    got = cpp.cpp_attend(q, k, v, sel, ctx, layout)
    torch.testing.assert_close(got, reference_attend(q, k, v, sel, ctx), atol=3e-5, rtol=1e-4)


def test_cpp_every_tile_equals_sdpa(kernel):
    """An independent oracle for the dense limit: SDPA with is_causal."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 300, 32, generator=g) for h in (6, 2, 2))
    ctx = AttentionContext(0, Phase.PREFILL, 2, 300, 300, 0, 0, 6, 2, 32**-0.5)
    layout = BlockLayout(ctx, 128)
    got = cpp.cpp_attend(q, k, v, layout.every_tile(6), ctx, layout)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-4)


def test_cpp_runs_multithreaded_like_single(kernel):
    q, k, v, ctx, layout, sel = fuzz_case(3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.cpp_attend(q, k, v, sel, ctx, layout)
        torch.set_num_threads(2)
        two = cpp.cpp_attend(q, k, v, sel, ctx, layout)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, two, atol=1e-6, rtol=1e-6)


def test_auto_picks_cpp_for_float32_cpu_and_flex_otherwise(kernel):
    q, k, v, ctx, layout, sel = fuzz_case(5)
    assert tile_kernel("auto", q, ctx) == "cpp"
    half = q.to(torch.bfloat16)
    assert tile_kernel("auto", half, ctx) == "flex"
    with pytest.raises(UsageError, match="prefill_backend='cpp' runs float32 on the CPU"):
        tile_kernel("cpp", half, ctx)
    out = attend_tiles("auto", q, k, v, sel, ctx, layout)
    rows = valid_rows(ctx).expand_as(out)
    expected = reference_attend(q, k, v, sel, ctx)
    torch.testing.assert_close(out[rows], expected[rows], atol=3e-5, rtol=1e-4)


def test_cpp_refuses_bad_shapes(kernel):
    q, k, v, ctx, layout, sel = fuzz_case(1)
    bad = dataclasses.replace(sel, mask=sel.mask[:, :1].contiguous())
    with pytest.raises(RuntimeError, match="selection must be"):
        cpp.cpp_attend(q, k, v, bad, ctx, layout)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=Path(__file__).parent,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )


_FALLBACK = """
    import warnings, torch
    from test_cpp_kernel import fuzz_case, valid_rows
    from sparseattn.backends import cpp, reference_attend
    from sparseattn.backends.tiles import attend_tiles, tile_kernel
    from sparseattn.errors import UsageError

    q, k, v, ctx, layout, sel = fuzz_case(11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tile_kernel("auto", q, ctx) == "flex"
        assert tile_kernel("auto", q, ctx) == "flex"
    messages = [str(w.message) for w in caught if "CPU kernel is unavailable" in str(w.message)]
    print("WARNINGS", len(messages))
    print("REASON", cpp.reason())
    out = attend_tiles("auto", q, k, v, sel, ctx, layout)
    rows = valid_rows(ctx).expand_as(out)
    # the flex path: the tolerance of the other flex-vs-reference tests (its fp32 accumulation
    # order differs from the reference's by a few 1e-5 on some CPUs)
    torch.testing.assert_close(out[rows], reference_attend(q, k, v, sel, ctx)[rows],
                               atol=1e-4, rtol=1e-4)
    try:
        tile_kernel("cpp", q, ctx)
    except UsageError as err:
        print("REFUSED", err)
"""


def test_fallback_without_a_compiler(tmp_path):
    """No usable compiler and nothing cached: one warning, flex runs and equals the reference,
    and an explicit 'cpp' is refused with the reason."""
    compiler = str(tmp_path / "no-such-compiler")
    run = _run(_FALLBACK, SPARSEATTN_CXX=compiler, SPARSEATTN_CACHE_DIR=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "WARNINGS 1" in run.stdout
    assert "no-such-compiler" in run.stdout  # the reason names what failed
    assert "REFUSED prefill_backend='cpp' is unavailable here" in run.stdout


def test_fallback_when_turned_off(tmp_path):
    run = _run(_FALLBACK, SPARSEATTN_CPP="0", SPARSEATTN_CACHE_DIR=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "WARNINGS 0" in run.stdout and "SPARSEATTN_CPP=0" in run.stdout
    assert not (tmp_path / "kernels").exists()


def test_kernel_builds_into_the_user_cache(kernel, tmp_path):
    """A fresh cache dir gets the library; nothing is written inside the package."""
    package = Path(cpp.__file__).parents[1]
    before = sorted(
        p.relative_to(package) for p in package.rglob("*") if "__pycache__" not in p.parts
    )
    run = _run(
        """
        from sparseattn.backends import cpp
        assert cpp.available(), cpp.reason()
        print("LIB", cpp.library_path(cpp.compiler()))
        """,
        SPARSEATTN_CACHE_DIR=str(tmp_path),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lib = Path(run.stdout.split("LIB ")[1].strip())
    assert lib.parent == tmp_path / "kernels" and lib.exists()
    after = sorted(
        p.relative_to(package) for p in package.rglob("*") if "__pycache__" not in p.parts
    )
    assert after == before


def test_cpp_wide_heads_and_windows_as_gemma(kernel):
    """Gemma 3's shape: head size 256, one KV head, a sliding window, a chunk after a prefix."""
    g = torch.Generator().manual_seed(9)
    ctx = AttentionContext(0, Phase.CHUNKED_PREFILL, 1, 190, 330, 140, 0, 4, 1, 256**-0.5, 100)
    q = torch.randn(1, 4, 190, 256, generator=g)
    k, v = torch.randn(1, 1, 330, 256, generator=g), torch.randn(1, 1, 330, 256, generator=g)
    layout = BlockLayout(ctx, 64)
    sel = layout.every_tile(4)
    got = cpp.cpp_attend(q, k, v, sel, ctx, layout)
    torch.testing.assert_close(got, reference_attend(q, k, v, sel, ctx), atol=3e-5, rtol=1e-4)


def test_a_corrupt_cached_library_is_rebuilt(kernel, tmp_path):
    run = _run(
        """
        from pathlib import Path
        from sparseattn.backends import cpp
        path = cpp.library_path(cpp.compiler())
        path.parent.mkdir(parents=True)
        path.write_bytes(b"not a library")
        assert cpp.available(), cpp.reason()
        assert path.stat().st_size > 1000
        """,
        SPARSEATTN_CACHE_DIR=str(tmp_path),
    )
    assert run.returncode == 0, run.stderr[-3000:]
