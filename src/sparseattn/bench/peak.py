"""Peak memory of one setting, not of the process since it started.

On CUDA the allocator's peak is reset before the setting runs. On Linux the kernel's resident
high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs, so the peak read after
the setting is the peak *during* it; memory earlier settings freed is first handed back to the
OS (``malloc_trim``), so it is not counted again. Elsewhere a sampling thread polls the
resident size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so the
    resident size a setting starts from holds no memory an earlier setting already freed."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_mb() -> float | None:
    """The process's resident memory now, in MiB (None where it cannot be read)."""
    kb = _status_kb("VmRSS")
    if kb is None:
        try:
            import psutil

            return psutil.Process().memory_info().rss / 2**20
        except ImportError:
            return None
    return kb / 1024


class PeakMemory:
    """Context manager: ``peak_mb`` is the highest memory reached inside the block.

    Attributes:
        peak_mb: CUDA: peak allocated bytes on the device; CPU: peak resident set of the process.
        start_mb: The same measure when the block started (what the setting did not add).
        method: "cuda-allocator", "vmhwm-reset" or "sampled".
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_mb: float | None = None
        self.start_mb: float | None = None
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            self.method = "cuda-allocator"
            return self
        release_freed_memory()
        self.start_mb = rss_mb()
        try:
            _CLEAR_REFS.write_text("5")
            self.method = "vmhwm-reset"
        except OSError:
            self.method = "sampled"
            self.peak_mb = self.start_mb
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def so_far_mb(self) -> float | None:
        """The peak reached since the block started, read inside it (None where unknown)."""
        if self.method == "cuda-allocator":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.method == "vmhwm-reset":
            kb = _status_kb("VmHWM")
            return None if kb is None else kb / 1024
        return self.peak_mb

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = rss_mb()
            if now is not None and (self.peak_mb is None or now > self.peak_mb):
                self.peak_mb = now

    def __exit__(self, *exc) -> None:
        if self.method == "cuda-allocator":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.method == "vmhwm-reset":
            kb = _status_kb("VmHWM")
            self.peak_mb = None if kb is None else kb / 1024
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
