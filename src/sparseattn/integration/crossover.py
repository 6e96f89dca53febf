"""Automatic ``min_length``: the key length from which a setting's sparse path beats dense.

Measured once per (method and knobs, kernel, device, dtype, head layout, tile size, torch,
CPU, thread count, sparseattn version and, for the C++ kernel, its build) and cached in the
user cache directory (``crossover.json`` under ``sparseattn.backends.cpp.cache_dir()``), so a
process pays for it once per machine, setting and head layout, never inside the package. The
file is shared by every process of the user: an entry is merged into it under an exclusive
lock (``crossover.json.lock``), the file read again inside the lock, so processes measuring at
once all keep their entries. The measurement is a short timing, in the same run,
of the model's dense path (SDPA, causal) and of the sparse path at each length of a ladder:
the method's own estimation on random queries and keys (its cost hardly depends on the data),
then ``TYPICAL_DENSITY`` of random tiles through the kernel (the density a method reaches on
random inputs says nothing about real ones) and the density count. The crossover is the
shortest length from which the sparse path is faster at that length and every longer one
measured; where it never is, the crossover is past the ladder and that setting never runs
sparse for that layout.

Choices: the density (0.3) sits in the range the dynamic prefill methods measure at 4K-8K;
a method whose estimation fails on random inputs is measured on the kernel alone. Tests
inject the measurement (``measured_by``) so they never depend on timing.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import statistics
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backends import cpp
from ..types import AttentionContext, Phase

try:
    import fcntl
except ImportError:  # not POSIX: entries are merged without a lock between processes
    fcntl = None

LADDER = (256, 512, 1024, 2048, 4096, 8192)
NEVER = 2**31 - 1  # a crossover past every length measured: sparse never runs
TYPICAL_DENSITY = 0.3
_FILE = "crossover.json"
_lock = threading.Lock()
_memo: dict[str, int] = {}


@dataclass(frozen=True)
class LayoutKey:
    """What the crossover depends on; ``text`` names it in the cache file."""

    kernel: str  # "cpp" or "flex"
    device: str
    dtype: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    method: str = ""  # the method and its knobs, e.g. "xattention[threshold=0.9]"

    @property
    def text(self) -> str:
        """The layout, then what it was measured under now: torch, CPU, thread count,
        sparseattn version and, for the C++ kernel, its build."""
        cpu = cpp.cpu_id()
        build = f"|kernel {kernel_build()}" if self.kernel == "cpp" else ""
        return (
            f"{self.method}|{self.kernel}|{self.device}|{self.dtype}|{self.num_q_heads}x"
            f"{self.num_kv_heads}x{self.head_dim}|b{self.block_size}|torch {torch.__version__}"
            f"|{cpu}|threads {torch.get_num_threads()}|sparseattn {package_version()}{build}"
        )


@functools.cache
def kernel_build() -> str:
    """The build of the C++ kernel this process runs: the digest its library is named by
    (sources, torch, compiler, flags, CPU; see ``cpp.library_path``)."""
    cxx = cpp.compiler()
    if cxx is None:
        return "no-compiler"
    try:
        return cpp.library_path(cxx).stem.removeprefix("block_sparse_")
    except OSError:  # a source file is missing: the kernel cannot be built at all
        return "no-source"


@functools.cache
def package_version() -> str:
    """The installed sparseattn version (its metadata; "unknown" when not installed)."""
    try:
        return importlib.metadata.version("sparseattn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def method_label(method) -> str:
    """``name[knob=value,...]`` of a method object."""
    knobs = ",".join(f"{k}={v}" for k, v in sorted(method.knobs().items()))
    return f"{method.name}[{knobs}]"


def _timed(fn: Callable[[], object], device: str, repeats: int = 3) -> float:
    from .stats import timed

    fn()
    times = []
    for _ in range(repeats):
        start = timed(device)
        fn()
        times.append(timed(device) - start)
    return statistics.median(times)


def measure(key: LayoutKey, method=None, lengths: tuple[int, ...] = LADDER) -> int:
    """Time dense vs sparse at each length (shortest first); returns the crossover length.

    Args:
        key: The layout and kernel to measure.
        method: The prefill method whose estimation is timed with the kernel (None: the
            kernel alone, as for a static pattern).
        lengths: The ladder of key lengths.
    """
    from ..backends import BlockLayout
    from ..backends.sdpa import dense_prefill
    from ..backends.tiles import attend_tiles, random_tiles

    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, key.dtype)
    estimate = method is not None and not method.static_pattern
    wins = []
    for length in lengths:
        ctx = AttentionContext(
            layer_idx=0,
            phase=Phase.PREFILL,
            batch=1,
            q_len=length,
            kv_len=length,
            q_offset=0,
            kv_offset=0,
            num_q_heads=key.num_q_heads,
            num_kv_heads=key.num_kv_heads,
            scaling=key.head_dim**-0.5,
            device=torch.device(key.device),
        )
        q = torch.randn(1, key.num_q_heads, length, key.head_dim, generator=g)
        k = torch.randn(1, key.num_kv_heads, length, key.head_dim, generator=g)
        q, k = q.to(key.device, dtype), k.to(key.device, dtype)
        layout = BlockLayout(ctx, key.block_size)
        raw = random_tiles(layout, TYPICAL_DENSITY, seed=length)

        def sparse(layout=layout, raw=raw, q=q, k=k, ctx=ctx):
            if estimate:
                method.select(q, k, ctx, layout)
            selection = layout.finalize(raw)
            out = attend_tiles(key.kernel, q, k, k, selection, ctx, layout)
            layout.density(selection)
            return out

        try:
            sparse()
        except Exception:  # the estimation cannot run on random inputs: time the kernel alone
            estimate = False
        dense_s = _timed(lambda q=q, k=k, ctx=ctx: dense_prefill(q, k, k, ctx), key.device)
        wins.append(_timed(sparse, key.device) < dense_s)
    for i, length in enumerate(lengths):
        if all(wins[i:]):
            return length
    return NEVER


_measure: Callable[[LayoutKey, object], int] = measure
_persist = True


@contextmanager
def measured_by(fn: Callable[[LayoutKey], int], persist: bool = False) -> Iterator[None]:
    """Use ``fn(key)`` instead of timing (tests), with the cache file read and written only
    when ``persist``; forgets what was resolved before and after."""
    global _measure, _persist
    previous = _measure, _persist
    _measure, _persist = (lambda key, method: fn(key)), persist
    _memo.clear()
    try:
        yield
    finally:
        _measure, _persist = previous
        _memo.clear()


def _read(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def crossover(key: LayoutKey, method=None) -> int:
    """The crossover of ``key``: from this process's memo, the cache file, or a measurement of
    ``method`` (see ``measure``)."""
    text = key.text
    with _lock:
        if text in _memo:
            return _memo[text]
        path = cpp.cache_dir() / _FILE
        stored = _read(path).get(text) if _persist else None
        if isinstance(stored, int):
            _memo[text] = stored
            return stored
        length = int(_measure(key, method))
        _memo[text] = length
        if _persist:
            _write(path, text, length)
        return length


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` + ".lock" (beside it) between processes."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _write(path: Path, text: str, length: int) -> None:
    """Merge one entry into the cache file: under the lock, read the file again (entries other
    processes wrote since this one read it are kept), add the entry, replace the file
    atomically. A read-only cache is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            entries = _read(path)
            entries[text] = length
            fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(entries, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except OSError:
        pass


def layout_key(
    kernel: str, q: torch.Tensor, ctx: AttentionContext, block_size: int, method=None
) -> LayoutKey:
    """The LayoutKey of one attention call run on ``kernel`` by ``method``."""
    return LayoutKey(
        kernel=kernel,
        device=q.device.type,
        dtype=str(q.dtype).removeprefix("torch."),
        num_q_heads=ctx.num_q_heads,
        num_kv_heads=ctx.num_kv_heads,
        head_dim=q.shape[-1],
        block_size=block_size,
        method="" if method is None or method.static_pattern else method_label(method),
    )
