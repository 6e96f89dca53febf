"""Build and load the block-sparse CPU kernel (``csrc/block_sparse.cpp``) at first use.

The kernel is one C++ file compiled by the system compiler against the running torch (its
headers, ``libtorch_cpu`` and the BLAS ``sgemm_`` it exports) into a shared library that
registers ``torch.ops.sparseattn.block_sparse_attention``. Nothing is compiled at install time:
the first call that needs it builds it (a few seconds) into the user's cache directory
(``$SPARSEATTN_CACHE_DIR``, else ``$XDG_CACHE_HOME/sparseattn``, else ``~/.cache/sparseattn``),
under a name derived from the source, the torch version, the compiler, the flags and the CPU,
so a later process loads it at once and a different machine or torch builds its own. Nothing
is ever written inside the package.

Where it cannot be built or loaded (no compiler, a torch without ``sgemm_``, a read-only
cache), ``available()`` is False, ``reason()`` says why, one warning is issued, and the
``auto`` backend runs FlexAttention instead. ``SPARSEATTN_CPP=0`` turns the kernel off;
``SPARSEATTN_CXX`` names the compiler (else ``CXX``, else ``c++`` / ``g++`` / ``clang++``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ..types import AttentionContext, BlockSelection
from .masks import BlockLayout

SOURCES = [
    Path(__file__).with_name("csrc") / f
    for f in ("block_sparse.cpp", "page_decode.cpp", "sparse_linear.cpp", "decode_step.cpp")
]
HEADERS = [Path(__file__).with_name("csrc") / f for f in ("softmax_exp.h", "sparse_linear.h")]
OPS = (
    "block_sparse_attention",
    "page_decode_attention",
    "sparse_input_linear",  # activation sparsity (sparse_linear.py)
    "sparse_output_linear",
    "decode_spec",  # the lean decode step's halves (integration/step.py)
    "decode_spec_free",
    "decode_qkv",
    "decode_mlp",
)
# -fopenmp: at::parallel_for is a header template whose OpenMP branch compiles only with it;
# without it every kernel call ran on one thread whatever torch.get_num_threads() said
_FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno"]
_FLAGS += ["-fno-trapping-math", "-Wno-deprecated-declarations"]
_lock = threading.Lock()
_state: dict[str, object] = {}
_NO_PADDING = torch.empty(0, dtype=torch.bool)


def cache_dir() -> Path:
    """The user cache directory of sparseattn (kernels, measured crossovers)."""
    explicit = os.environ.get("SPARSEATTN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparseattn"


def enabled() -> bool:
    """False when ``SPARSEATTN_CPP=0``."""
    return os.environ.get("SPARSEATTN_CPP", "1") != "0"


def compiler() -> str | None:
    """``$SPARSEATTN_CXX``, else ``$CXX``, else the first of ``c++`` / ``g++`` / ``clang++`` on
    the PATH."""
    explicit = os.environ.get("SPARSEATTN_CXX") or os.environ.get("CXX")
    if explicit:
        return explicit
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "model name"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def cpu_id() -> str:
    """A short stable name of this CPU (model and features), for cache keys."""
    return hashlib.sha256(_cpu_signature().encode()).hexdigest()[:12]


def _arch_flags(cxx: str) -> list[str]:
    """-march=native (and 512-bit vectors where the CPU has them) if the compiler takes it."""
    probe = subprocess.run(
        [cxx, "-march=native", "-x", "c++", "-E", "-", "-o", os.devnull],
        input="",
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return []
    flags = ["-march=native"]
    if "avx512f" in _cpu_signature():
        flags.append("-mprefer-vector-width=512")
    return flags


def _command(cxx: str, output: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, *_FLAGS, *_arch_flags(cxx), f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    cmd += [f"-I{p}" for p in include_paths()]
    cmd += [*map(str, SOURCES), "-o", str(output)]
    for lib in library_paths():
        cmd += [f"-L{lib}", f"-Wl,-rpath,{lib}"]
    return cmd + ["-ltorch_cpu", "-lc10", "-Wl,--no-undefined"]


def library_path(cxx: str) -> Path:
    """Where the kernel built by ``cxx`` for this source, torch and CPU lives."""
    digest = hashlib.sha256()
    texts = (s.read_bytes() for s in (*SOURCES, *HEADERS))
    for part in (*texts, torch.__version__.encode(), cxx.encode()):
        digest.update(part)
    digest.update(" ".join(_FLAGS).encode())
    digest.update(_cpu_signature().encode())
    return cache_dir() / "kernels" / f"block_sparse_{digest.hexdigest()[:16]}.so"


def _build(cxx: str, target: Path) -> None:
    """Compile into a temporary file next to ``target``, then move it in place (atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run(_command(cxx, Path(tmp)), capture_output=True, text=True, check=False)
        if run.returncode != 0:
            tail = (run.stderr or run.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"{cxx} failed: " + " | ".join(tail))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> None:
    if not enabled():
        raise RuntimeError("turned off by SPARSEATTN_CPP=0")
    if all(hasattr(torch.ops.sparseattn, op) for op in OPS):
        return  # already registered in this process
    missing = [str(s) for s in (*SOURCES, *HEADERS) if not s.exists()]
    if missing:
        raise RuntimeError(f"kernel source {missing[0]} is missing from the installation")
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set SPARSEATTN_CXX or CXX)")
    target = library_path(cxx)
    if not target.exists():
        _build(cxx, target)
    try:
        torch.ops.load_library(str(target))
    except OSError:  # a truncated or foreign file under our name: build it again, once
        _build(cxx, target)
        torch.ops.load_library(str(target))


def available() -> bool:
    """Whether the kernel is loaded (building it on the first call); never raises."""
    with _lock:
        if "ok" not in _state:
            try:
                _load()
                _state["ok"], _state["reason"] = True, None
            except Exception as err:  # any failure means: use the fallback
                _state["ok"], _state["reason"] = False, f"{type(err).__name__}: {err}"
                if enabled():
                    warnings.warn(
                        f"sparseattn: the block-sparse CPU kernel is unavailable ({err}); "
                        "prefill runs FlexAttention instead",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return bool(_state["ok"])


def reason() -> str | None:
    """Why the kernel is unavailable (None when it is loaded or not tried yet)."""
    return _state.get("reason")  # type: ignore[return-value]


def reset() -> None:
    """Forget the outcome of the last attempt (the next ``available()`` tries again)."""
    with _lock:
        _state.clear()


def runs_on(q: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: float32 on the CPU, and not turned off."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and enabled()


def supports(q: torch.Tensor, ctx: AttentionContext) -> bool:
    """Whether the kernel can run this call: float32 on the CPU, contiguous key positions."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and ctx.contiguous


def cpp_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    ctx: AttentionContext,
    layout: BlockLayout | None = None,
) -> torch.Tensor:
    """Run the selected tiles with the C++ kernel (call ``available()`` first).

    Each (batch row, KV head, query tile) runs an online softmax over the selected key tiles
    of its query heads, with one sgemm per run of consecutive tiles straight on k and v (GQA
    reads the group's KV head, never a copy per query head); full tiles every head of the group
    selected run once with the group's query rows stacked. Tiles whose every pair is visible
    run unmasked; the rest (diagonal, window edges, padding, a ragged last tile) are masked at
    token level from positions, each half of their query rows computing only the key columns
    it can see; the softcap (Gemma 2) applies to every score.

    Args:
        q: (B, Hq, Lq, D) float32.
        k: (B, Hkv, Lk, D) float32.
        v: (B, Hkv, Lk, Dv) float32.
        selection: Finalized tiles (B, Hq, nQ, nK).
        ctx: The call's context (contiguous key positions).
        layout: The BlockLayout of ``selection.block_size`` if the caller already has it.

    Returns:
        (B, Lq, Hq, Dv). Rows with no visible key are zero.
    """
    layout = layout or BlockLayout(ctx, selection.block_size)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    key_valid = ctx.key_valid
    key_valid = _NO_PADDING if key_valid is None else key_valid.contiguous()
    return torch.ops.sparseattn.block_sparse_attention(
        q,
        k,
        v,
        selection.mask.contiguous(),
        layout.full.contiguous(),
        key_valid,
        selection.block_size,
        ctx.q_offset,
        ctx.kv_offset,
        ctx.sliding_window or 0,
        ctx.scaling,
        ctx.softcap or 0.0,
    )


PAGE_DECODE_ROWS = 16  # query rows one page_decode_attention call takes (kMaxRows in its source)


def page_decode(
    rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pages: torch.Tensor,
    page_size: int,
    tail: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """Decode attention over chosen cache pages read in place (call ``available()`` first).

    Each (batch row, KV head) runs an online softmax over its pages, then the tail slots, with
    the group's query heads as rows: no gather, no mask, no copy of K or V. The kernel takes at
    most ``PAGE_DECODE_ROWS`` rows per KV head; a wider GQA group (e.g. 32 query heads on one
    KV head) runs as consecutive chunks of that many rows over the same pages (rows are
    independent queries, so the chunks' outputs are the group's).

    Args:
        rows: (B, Hkv, g, D) float32 queries, the g query heads of each KV head.
        k: (B, Hkv, S, D) float32 keys, last dimension contiguous (a view of the cache).
        v: (B, Hkv, S, Dv) float32 values, likewise.
        pages: (B, Hkv, n) long page indices, every one held and visible.
        page_size: Slots per page.
        tail: Slots [start, stop) read after the pages.
        scale: Softmax scale.

    Returns:
        (B, Hkv, g, Dv).
    """
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    pages, g = pages.contiguous(), rows.shape[2]

    def run(part: torch.Tensor) -> torch.Tensor:  # (B, Hkv, <= 16, D) -> (B, Hkv, <= 16, Dv)
        return torch.ops.sparseattn.page_decode_attention(
            part.contiguous(), k, v, pages, page_size, tail[0], tail[1], scale
        )

    if g <= PAGE_DECODE_ROWS:  # one call, no list (every model with <= 16 heads per KV head)
        return run(rows)
    chunks = [
        run(rows[:, :, first : first + PAGE_DECODE_ROWS]) for first in range(0, g, PAGE_DECODE_ROWS)
    ]
    return torch.cat(chunks, 2)  # (B, Hkv, g, Dv)
