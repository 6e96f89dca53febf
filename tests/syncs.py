"""Host syncs of decode steps: one counter and one decode loop for every test that counts them.

A host sync is an op that makes the host wait for a tensor's value: ``.item()``, ``int()``,
``bool()`` and ``float()`` of a tensor (``aten._local_scalar_dense``), ``.tolist()``,
``torch.equal``, an op whose output size depends on values (``nonzero``, ``masked_select``,
``unique``, boolean indexing, ``repeat_interleave`` by a tensor without ``output_size``) and a
copy from the GPU to the host. On CPU none of them waits for anything, so they are counted (at
dispatch, ``tolist`` by a wrapper); on CUDA the decode loop also runs under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any sync the count would miss.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparseattn.cache import SparseCache

aten = torch.ops.aten

READS = {aten._local_scalar_dense.default, aten.equal.default}
VALUE_SIZED = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}
COPIES = {aten._to_copy.default, aten.copy_.default}


def _boolean(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _to_host(func, args, kwargs) -> bool:
    """A copy whose source is on a GPU and whose destination is the host."""
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        return args[0].device.type != "cpu" and device is not None and device.type == "cpu"
    return args[0].device.type == "cpu" and args[1].device.type != "cpu"


def is_host_sync(func, args, kwargs) -> bool:
    """Whether the aten op ``func`` called with ``args`` waits for a tensor's value."""
    if func in READS or func in VALUE_SIZED:
        return True
    if func in INDEXING:
        return _boolean(args[1])
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    return func in COPIES and _to_host(func, args, kwargs)


def caller() -> str:
    """'sparseattn/methods/decode/tokenselect.py:116': the innermost frame on the stack outside
    torch and this file (where the library, transformers or the test asked for the value)."""
    here = os.path.abspath(__file__)
    frames = [
        f
        for f in traceback.extract_stack()
        if f.filename != here and f"{os.sep}torch{os.sep}" not in f.filename
    ]
    frame = frames[-1]
    path = frame.filename
    for root in (f"{os.sep}site-packages{os.sep}", f"{os.sep}src{os.sep}"):
        path = path.split(root)[-1]
    return f"{path}:{frame.lineno}"


class CountHostSyncs(TorchDispatchMode):
    """Counts host syncs (see the module docstring) while active, and ``Tensor.tolist`` (a CPU
    tensor's list is read without a dispatched op); ``ops`` names each one and where it was
    called ('aten.equal.default at sparseattn/cache/layers.py:312')."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self._tolist = torch.Tensor.tolist
        self._own_tolist = "tolist" in vars(torch.Tensor)  # else inherited from TensorBase

    @property
    def count(self) -> int:
        return len(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_host_sync(func, args, kwargs):
            self.ops.append(f"{func} at {caller()}")
        return func(*args, **kwargs)

    def __enter__(self):
        original, ops = self._tolist, self.ops

        def tolist(tensor):
            ops.append(f"Tensor.tolist at {caller()}")
            return original(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        if self._own_tolist:
            torch.Tensor.tolist = self._tolist
        else:
            del torch.Tensor.tolist
        return super().__exit__(*exc)


@contextmanager
def sync_debug_errors(device: torch.device):
    """On CUDA, any host sync raises inside the block (``set_sync_debug_mode("error")``)."""
    if device.type != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


@dataclass
class DecodeRun:
    """What ``decode_steps`` saw.

    Attributes:
        cache: The SparseCache after the last step.
        syncs: The host syncs of each decode step, in order (op names).
        prompt_capacity: Slots each cache layer had room for after the prompt.
    """

    cache: SparseCache
    syncs: list[list[str]]
    prompt_capacity: list[int]

    @property
    def count(self) -> int:
        """Host syncs over every step."""
        return sum(len(step) for step in self.syncs)

    @property
    def grown(self) -> list[int]:
        """The layers whose key/value buffers grew during the decode steps."""
        now = capacities(self.cache)
        return [i for i, (a, b) in enumerate(zip(self.prompt_capacity, now)) if b > a]


def capacities(cache: SparseCache) -> list[int]:
    return [getattr(layer, "capacity", 0) for layer in cache.layers]


def decode_steps(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    steps: int = 4,
    each_step: Callable[[SparseCache], None] | None = None,
    warmup: int = 0,
) -> DecodeRun:
    """Prefill ``ids`` into a fresh SparseCache, then decode ``steps`` greedy tokens one forward
    at a time, counting the host syncs of each step (the prompt's are not counted).

    Call it inside ``sparse_attention``. ``each_step(cache)`` runs after every step, outside
    the count. On CUDA the steps from ``warmup`` on run under sync debug mode "error" (the
    first ones may copy what the methods build once to the device).
    """
    cache = SparseCache(model)
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    token, running = out.logits[:, -1:].argmax(-1), mask
    run = DecodeRun(cache, [], capacities(cache))
    for step in range(steps):
        running = torch.cat([running, torch.ones_like(running[:, :1])], 1)
        counter = CountHostSyncs()
        device = ids.device if step >= warmup else torch.device("cpu")
        with sync_debug_errors(device), counter:
            out = model(input_ids=token, attention_mask=running, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
        run.syncs.append(counter.ops)
        if each_step is not None:
            each_step(cache)
    return run
