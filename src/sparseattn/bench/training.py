"""Resumable training of a few tensors beside a frozen model: what the DuoAttention
(``bench/duo.py``, arXiv:2410.10819) and SeerAttention (``bench/seer.py``, arXiv:2410.13276)
gate trainers share.

A trainer names the tensors it trains (``tensors``); this module gives it the optimiser and
schedule, the timed optimiser step, the checkpoint state (the knobs that decide the result,
the model's fingerprint, the step, the trained tensors, the optimiser and scheduler state, the
loss history, the sliding-window layers, the timings and torch's RNG state), the refusal of a
checkpoint made with other knobs or for another model, the atomic checkpoint file, and the
run loop with its progress bar, periodic checkpoints and resume.

Choices:
- AdamW without weight decay (i.e. Adam) at the config's ``lr``, with the DuoAttention
  reference runs' schedule (``lr_factor``): linear warm-up from 0.1 x lr over the first fifth
  of the steps, linear decay back to 0.1 x lr over the last fifth.
- sample i of a run is ``data(i)``: the data position is the step, so a resumed run sees
  exactly the data an uninterrupted one would.
- a checkpoint is written every ``checkpoint_every`` steps, at the end, and, on Ctrl-C, at the
  last finished step; a hard kill loses the steps since the last one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from ..errors import UsageError
from ..integration.hf import decoder_of
from ..profiles import fingerprint

FORMAT = 1  # the checkpoint layout's version


class TrainingKnobs:
    """Mixin of a training run's knob dataclass (it has ``lr``, ``steps``, ``checkpoint_every``)."""

    def recorded(self) -> dict[str, Any]:
        """The knobs that decide the result (all but how often it is checkpointed)."""
        knobs = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: v for k, v in knobs.items() if k != "checkpoint_every"}


def lr_factor(step: int, steps: int) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): warm-up and decay over a fifth each."""
    fifth = max(steps // 5, 1)
    return min(1.0, max((step + 1) / fifth, 0.1), max((steps - step) / fifth, 0.1))


class FrozenModelTrainer:
    """A few trained tensors beside a frozen model, their optimiser, history and timings.

    A subclass creates its tensors (attributes named in ``tensors``, saved under those names)
    and then calls ``start_optimiser``; it defines ``progress_step`` and its own ``train_step``
    on top of ``optimise``.

    Args:
        model: A transformers causal LM (its weights are not changed; they never get grads).
        config: The run's knobs (a ``TrainingKnobs`` dataclass).
    """

    tensors: ClassVar[tuple[str, ...]]  # the trained tensors' attribute (and state) names
    checkpoint_file: ClassVar[str]  # the checkpoint's file name in the --checkpoint folder
    progress_label: ClassVar[str]  # the progress bar's description

    def __init__(self, model: torch.nn.Module, config: Any):
        self.model, self.config = model, config
        self.decoder = decoder_of(model)
        self.step = 0
        self.history: list[Any] = []  # one record per step, taken before it
        self.sliding_layers: set[int] = set()
        self.seconds = 0.0  # wall time of the steps
        self.cpu_seconds = 0.0  # this process's CPU time in them (not inflated by other load)

    def start_optimiser(self) -> None:
        """AdamW (no weight decay) over ``tensors`` with ``lr_factor``'s schedule."""
        params = [getattr(self, name) for name in self.tensors]
        steps = self.config.steps
        self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, steps)
        )

    def optimise(self, objective: Callable[[], tuple[torch.Tensor, Any]]) -> Any:
        """One timed optimiser step on ``objective() -> (loss to minimise, history record)``;
        returns the record (taken before the step)."""
        start, cpu = time.perf_counter(), time.process_time()
        with torch.enable_grad():  # whatever the caller's grad mode
            loss, record = objective()
            loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.after_update()
        self.step += 1
        self.history.append(record)
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu
        return record

    def after_update(self) -> None:
        """Called after each optimiser update (e.g. to clamp the tensors); nothing here."""

    def progress_step(self, sample: Any) -> dict[str, Any]:
        """One training step on ``sample`` (``data(step)``); returns the progress bar's fields.
        Each trainer (duo, seer) defines it: the base class has no loss of its own."""
        raise NotImplementedError(f"{type(self).__name__} must define progress_step")

    @staticmethod
    def restored_record(record: Any) -> Any:
        """A history record as loaded from a checkpoint, in the form ``optimise`` keeps."""
        return record

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs, copied (safe to keep while training goes on)."""
        trained = {name: getattr(self, name).detach().clone().cpu() for name in self.tensors}
        return {
            "format": FORMAT,
            "config": self.config.recorded(),
            "model": fingerprint(self.model.config),
            "step": self.step,
            **trained,
            "optimizer": _cloned(self.optimizer.state_dict()),
            "scheduler": dict(self.scheduler.state_dict()),
            "history": list(self.history),
            "sliding_layers": sorted(self.sliding_layers),
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "rng": torch.get_rng_state(),
        }

    def load_state(self, state: dict[str, Any], source: str) -> None:
        """Continue from ``state``; UsageError when it was made with other knobs or model."""
        want = self.config.recorded()
        changed = [k for k in want if state["config"].get(k) != want[k]]
        if changed:
            diffs = ", ".join(f"{k}={state['config'].get(k)} there, {want[k]} now" for k in changed)
            raise UsageError(
                f"checkpoint {source} was made with other settings ({diffs}); resume with the "
                "same settings or use another --checkpoint folder"
            )
        if state["model"] != fingerprint(self.model.config):
            raise UsageError(f"checkpoint {source} was made for another model: {state['model']}")
        with torch.no_grad():
            for name in self.tensors:
                getattr(self, name).copy_(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.history = [self.restored_record(r) for r in state["history"]]
        self.sliding_layers, self.seconds = set(state["sliding_layers"]), state["seconds"]
        self.cpu_seconds = state.get("cpu_seconds", math.nan)  # nan: not recorded (early duo)
        torch.set_rng_state(state["rng"])


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone().cpu()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cloned(v) for v in value]
    return value


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def refuse_existing(path: Path) -> None:
    """UsageError when ``path`` already holds a checkpoint (a run without --resume)."""
    if path.exists():
        raise UsageError(
            f"{path} already holds a checkpoint; pass --resume to continue it or choose "
            "another --checkpoint folder"
        )


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """``model`` without grads and in eval mode (no dropout) inside; flags and mode restored."""
    flags, training = [p.requires_grad for p in model.parameters()], model.training
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(training)


Trainer = TypeVar("Trainer", bound=FrozenModelTrainer)


def run_training(
    trainer: Trainer,
    data: Callable[[int], Any],
    *,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[Trainer], None] | None = None,
) -> Trainer:
    """Train ``trainer`` up to ``config.steps`` steps on ``data(step)``; returns it.

    Args:
        trainer: A fresh trainer (step 0).
        data: ``data(i)`` gives sample i, handed to ``trainer.progress_step``.
        checkpoint: Folder for checkpoints (every ``config.checkpoint_every`` steps, at the end,
            and at the last finished step when interrupted).
        resume: Continue from the folder's checkpoint (start at step 0 if it has none).
        progress: Show a tqdm bar with the trainer's fields and the ETA.
        on_step: Called after every step (and after its checkpoint, if one was due).

    Raises:
        UsageError: a checkpoint exists and ``resume`` is off, or it was made with other
            knobs or for another model.
    """
    from tqdm.auto import tqdm

    config = trainer.config
    folder = Path(checkpoint) if checkpoint is not None else None
    path = folder / trainer.checkpoint_file if folder is not None else None
    if path is not None and path.exists():
        if not resume:
            refuse_existing(path)
        trainer.load_state(torch.load(path, weights_only=False), str(path))
    elif resume:
        print(f"no checkpoint in {folder}: starting at step 0", file=sys.stderr)
    with frozen(trainer.model):  # the gated and the full pass see the same network
        bar = tqdm(
            total=config.steps,
            initial=trainer.step,
            desc=trainer.progress_label,
            disable=not progress,
        )
        last = trainer.state()
        try:
            while trainer.step < config.steps:
                fields = trainer.progress_step(data(trainer.step))
                last = trainer.state()
                done = trainer.step == config.steps
                if path is not None and (trainer.step % config.checkpoint_every == 0 or done):
                    save_checkpoint(last, path)
                bar.set_postfix(**fields)
                bar.update(1)
                if on_step is not None:
                    on_step(trainer)
        except KeyboardInterrupt:
            if path is not None:  # the last finished step, not a half-done one
                save_checkpoint(last, path)
                print(f"\ninterrupted: step {last['step']} saved in {path}", file=sys.stderr)
            raise
        finally:
            bar.close()
    return trainer
