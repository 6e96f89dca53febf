"""DuoAttention gate optimisation (``sparseattn profile --kind duo``).

DuoAttention (Xiao et al., arXiv:2410.10819) gives every KV head of every layer a gate alpha in
[0, 1]: the head's attention output becomes alpha x full causal attention + (1 - alpha) x
streaming attention (sink + recent window) of the same q, k, v. With the model frozen, only the
gates are optimised, on synthetic passkey retrieval data, so that the gated model's final
hidden states match the full model's at the answer positions (an L2 distillation loss) while an
L1 penalty pushes the gates down: heads whose gate stays high are retrieval heads (full KV),
the others streaming heads (sink + window KV).

Choices (the paper's values unless said otherwise):
- gates start at 1 (the gated model is the full model, loss 0); ``sink`` 128 and ``window``
  256 tokens during training; AdamW (weight decay 0, i.e. Adam) with ``lr`` 0.02, batch 1,
  ``l1`` 0.05 on the sum of |alpha| over the gated heads; gates clamped to [0, 1] after each
  step. The paper trains 2000 steps on 1K-32K tokens; on one CPU core we train fewer steps
  (``steps``) at one fixed ``length`` (default 2K), so every step costs the same.
- the learning rate follows the reference runs' schedule: linear warm-up from 0.1 x lr to lr
  over the first fifth of the steps, linear decay back to 0.1 x lr over the last fifth.
- distillation loss: squared difference of the final hidden states (after the final norm, the
  base model's output), averaged over the hidden size and over the answer positions (the
  recited passkeys, ``bench/tasks/passkey.py``: ``passkeys`` keys of ``words`` words).
- the target hidden states come from the model's own attention implementation (a separate
  no-grad pass), the gated pass from ``integration/gated.py``'s registered attention function.
- sliding-window layers (Gemma 3's local layers) keep their own window and are not gated; their
  gates stay 1 and are listed in the profile's ``calibration["sliding_layers"]``.
- sample i of the run is generated from (seed, i): the data position is the step, so a resumed
  run sees exactly the data an uninterrupted one would. Checkpoints hold the gates, the
  optimiser and scheduler state, the step, the loss history and torch's RNG state.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import UsageError
from ..integration.gated import gated_attention
from ..integration.hf import decoder_of
from ..methods.base import knob, validate_knobs
from ..profiles import fingerprint

CHECKPOINT = "duo-gates.pt"
_BIG = 2**31 - 1

# one training sample: (1, L) token ids and the index of the first loss position
Sample = tuple[torch.Tensor, int]


@dataclass
class DuoTraining:
    """The knobs of a gate optimisation run (validated on creation)."""

    name: ClassVar[str] = "duo"
    sink: int = knob(128, low=0, high=_BIG, help="sink tokens of the streaming branch")
    window: int = knob(256, low=1, high=_BIG, help="recent tokens of the streaming branch")
    length: int = knob(2048, low=2, high=_BIG, help="tokens per training sample")
    steps: int = knob(150, low=1, high=_BIG, help="optimisation steps (one sample each)")
    lr: float = knob(0.02, low=1e-6, high=1.0, help="peak learning rate")
    l1: float = knob(0.05, low=0.0, high=100.0, help="weight of the L1 penalty on the gates")
    seed: int = knob(0, low=0, high=_BIG, help="seed of the generated samples")
    passkeys: int = knob(10, low=1, high=20, help="passkeys hidden in each sample")
    words: int = knob(8, low=1, high=64, help="words per passkey")
    checkpoint_every: int = knob(10, low=1, high=_BIG, help="steps between checkpoints")

    def __post_init__(self) -> None:
        validate_knobs(self)
        if self.sink + self.window >= self.length:
            raise UsageError(
                f"duo: sink + window = {self.sink + self.window} must be below length "
                f"{self.length}; otherwise streaming equals full attention and nothing is learnt"
            )

    def recorded(self) -> dict[str, Any]:
        """The knobs that decide the result (all but how often it is checkpointed)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "checkpoint_every"}


def lr_factor(step: int, steps: int) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): warm-up and decay over a fifth each."""
    fifth = max(steps // 5, 1)
    return min(1.0, max((step + 1) / fifth, 0.1), max((steps - step) / fifth, 0.1))


class GateTrainer:
    """The gates, their optimiser and the loss of one (frozen) model.

    Args:
        model: A transformers causal LM (its weights are not changed; they never get grads).
        config: The run's knobs.
    """

    def __init__(self, model: torch.nn.Module, config: DuoTraining):
        self.model, self.config = model, config
        self.decoder = decoder_of(model)
        fp = fingerprint(model.config)
        device = next(model.parameters()).device
        shape = (fp["num_hidden_layers"], fp["num_key_value_heads"])
        self.gates = torch.ones(shape, device=device, requires_grad=True)  # (layers, Hkv)
        self.optimizer = torch.optim.AdamW([self.gates], lr=config.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.steps)
        )
        self.step = 0
        self.history: list[tuple[float, float]] = []  # (distill, l1 sum) per step
        self.sliding_layers: set[int] = set()
        self.seconds = 0.0  # wall time of the steps
        self.cpu_seconds = 0.0  # this process's CPU time in them (not inflated by other load)

    def gated_rows(self) -> torch.Tensor:
        """(layers,) bool: the layers whose gates are trained (not sliding-window layers)."""
        rows = torch.ones(self.gates.shape[0], dtype=torch.bool, device=self.gates.device)
        rows[sorted(self.sliding_layers)] = False
        return rows

    def loss(self, ids: torch.Tensor, answer_start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(distillation loss, sum of |gate| over gated heads) on one sample.

        Args:
            ids: (1, L) token ids.
            answer_start: First loss position.
        """
        with torch.no_grad():  # the full model, through its own attention implementation
            target = self.decoder(input_ids=ids, use_cache=False).last_hidden_state
        c = self.config
        with gated_attention(self.model, self.gates, sink=c.sink, window=c.window) as bound:
            hidden = self.decoder(input_ids=ids, use_cache=False).last_hidden_state
        self.sliding_layers |= bound.sliding_layers
        if not self.gated_rows().any():
            raise UsageError(
                "every attention layer of this model has its own sliding window; "
                "there are no full-attention heads to gate"
            )
        diff = hidden[:, answer_start:].float() - target[:, answer_start:].float()  # (1, A, H)
        distill = diff.pow(2).mean(-1).mean()
        return distill, self.gates[self.gated_rows()].abs().sum()

    def train_step(self, ids: torch.Tensor, answer_start: int) -> tuple[float, float]:
        """One optimiser step; returns (distill, l1 sum) before the step."""
        start, cpu = time.perf_counter(), time.process_time()
        with torch.enable_grad():  # whatever the caller's grad mode
            distill, reg = self.loss(ids, answer_start)
            (distill + self.config.l1 * reg).backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.gates.clamp_(0.0, 1.0)
        self.step += 1
        record = (float(distill.detach()), float(reg.detach()))
        self.history.append(record)
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu
        return record

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs, copied (safe to keep while training goes on)."""
        return {
            "format": 1,
            "config": self.config.recorded(),
            "model": fingerprint(self.model.config),
            "step": self.step,
            "gates": self.gates.detach().clone().cpu(),
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
            self.gates.copy_(state["gates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history = state["step"], [tuple(h) for h in state["history"]]
        self.sliding_layers, self.seconds = set(state["sliding_layers"]), state["seconds"]
        self.cpu_seconds = state.get("cpu_seconds", math.nan)  # nan: not recorded
        torch.set_rng_state(state["rng"])


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone().cpu()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cloned(v) for v in value]
    return value


def save_checkpoint(state: dict[str, Any], folder: Path) -> None:
    """Write ``state`` to folder/duo-gates.pt atomically (a crash never leaves half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, folder / CHECKPOINT)


def train_gates(
    model: torch.nn.Module,
    data: Callable[[int], Sample],
    config: DuoTraining,
    *,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[GateTrainer], None] | None = None,
) -> GateTrainer:
    """Optimise the gates of ``model`` for ``config.steps`` steps; returns the trainer.

    Args:
        model: A transformers causal LM (frozen and in eval mode for the run; its grad flags
            and mode are restored after).
        data: ``data(i)`` gives sample i: (1, L) ids and the first loss position.
        config: The run's knobs.
        checkpoint: Folder for checkpoints (every ``config.checkpoint_every`` steps, at the end,
            and at the last finished step when interrupted).
        resume: Continue from the folder's checkpoint (start at step 0 if it has none).
        progress: Show a tqdm bar with the loss, the mean gate and the ETA.
        on_step: Called after every step (and after its checkpoint, if one was due).

    Raises:
        UsageError: a checkpoint exists and ``resume`` is off, or it was made with other
            knobs or for another model.
    """
    from tqdm.auto import tqdm

    trainer = GateTrainer(model, config)
    folder = Path(checkpoint) if checkpoint is not None else None
    path = folder / CHECKPOINT if folder is not None else None
    if path is not None and path.exists():
        if not resume:
            raise UsageError(
                f"{path} already holds a checkpoint; pass --resume to continue it or choose "
                "another --checkpoint folder"
            )
        trainer.load_state(torch.load(path, weights_only=False), str(path))
    elif resume:
        print(f"no checkpoint in {folder}: starting at step 0", file=sys.stderr)
    flags, training = [p.requires_grad for p in model.parameters()], model.training
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # no dropout: the gated and the full pass see the same network
    bar = tqdm(total=config.steps, initial=trainer.step, desc="duo gates", disable=not progress)
    last = trainer.state()
    try:
        while trainer.step < config.steps:
            ids, answer_start = data(trainer.step)
            distill, reg = trainer.train_step(ids, answer_start)
            last = trainer.state()
            done = trainer.step == config.steps
            if folder is not None and (trainer.step % config.checkpoint_every == 0 or done):
                save_checkpoint(last, folder)
            gates = trainer.gates.detach()[trainer.gated_rows()]
            bar.set_postfix(
                loss=f"{distill + config.l1 * reg:.4f}",
                distill=f"{distill:.4f}",
                gate=f"{float(gates.mean()):.3f}",
                retrieval=int((gates >= 0.5).sum()),
            )
            bar.update(1)
            if on_step is not None:
                on_step(trainer)
    except KeyboardInterrupt:
        if folder is not None:  # the last finished step, not a half-done one
            save_checkpoint(last, folder)
            print(f"\ninterrupted: step {last['step']} saved in {path}", file=sys.stderr)
        raise
    finally:
        bar.close()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(training)
    return trainer
