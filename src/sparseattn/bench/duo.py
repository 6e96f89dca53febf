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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import UsageError
from ..integration.gated import gated_attention
from ..methods.base import knob, validate_knobs
from ..profiles import fingerprint
from .training import FrozenModelTrainer, TrainingKnobs, run_training

CHECKPOINT = "duo-gates.pt"
_BIG = 2**31 - 1

# one training sample: (1, L) token ids and the index of the first loss position
Sample = tuple[torch.Tensor, int]


@dataclass
class DuoTraining(TrainingKnobs):
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


class GateTrainer(FrozenModelTrainer):
    """The gates, their optimiser and the loss of one (frozen) model.

    Args:
        model: A transformers causal LM (its weights are not changed; they never get grads).
        config: The run's knobs.
    """

    tensors = ("gates",)
    checkpoint_file = CHECKPOINT
    progress_label = "duo gates"
    config: DuoTraining
    history: list[tuple[float, float]]  # (distill, l1 sum) per step

    def __init__(self, model: torch.nn.Module, config: DuoTraining):
        super().__init__(model, config)
        fp = fingerprint(model.config)
        device = next(model.parameters()).device
        shape = (fp["num_hidden_layers"], fp["num_key_value_heads"])
        self.gates = torch.ones(shape, device=device, requires_grad=True)  # (layers, Hkv)
        self.start_optimiser()

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

        def objective() -> tuple[torch.Tensor, tuple[float, float]]:
            distill, reg = self.loss(ids, answer_start)
            return distill + self.config.l1 * reg, (float(distill.detach()), float(reg.detach()))

        return self.optimise(objective)

    def after_update(self) -> None:
        with torch.no_grad():
            self.gates.clamp_(0.0, 1.0)

    def progress_step(self, sample: Sample) -> dict[str, Any]:
        """One step on ``sample``; the bar shows the loss, the mean gate and the retrieval heads."""
        distill, reg = self.train_step(*sample)
        gates = self.gates.detach()[self.gated_rows()]
        return {
            "loss": f"{distill + self.config.l1 * reg:.4f}",
            "distill": f"{distill:.4f}",
            "gate": f"{float(gates.mean()):.3f}",
            "retrieval": int((gates >= 0.5).sum()),
        }

    @staticmethod
    def restored_record(record: Any) -> tuple[float, float]:
        """A checkpoint's (distill, l1 sum) record as a tuple, whatever sequence it was saved as."""
        return tuple(record)


def train_gates(
    model: torch.nn.Module, data: Callable[[int], Sample], config: DuoTraining, **options: Any
) -> GateTrainer:
    """Optimise the gates of ``model`` for ``config.steps`` steps; returns the trainer.

    Args:
        model: A transformers causal LM (frozen and in eval mode for the run; its grad flags
            and mode are restored after).
        data: ``data(i)`` gives sample i: (1, L) ids and the first loss position.
        config: The run's knobs.
        **options: ``checkpoint`` (folder), ``resume``, ``progress`` (bar), ``on_step``
            (callback): ``training.run_training``'s options, with what it raises.
    """
    return run_training(GateTrainer(model, config), data, **options)
