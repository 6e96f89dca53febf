"""SeerAttention gate training by self-distillation (``sparseattn profile --kind seer``).

SeerAttention (Gao et al., arXiv:2410.13276) learns one AttnGate per layer (``methods/seer.py``:
pooled queries and keys, projections to ``gate_dim``, tile logits) while the model stays
frozen. The target of a layer is its own attention, pooled to tiles: the largest attention
probability inside each (query tile, key tile), normalised over the key tiles of the query
tile; the loss is KL(target || gate softmax), averaged over the visible query tiles, the query
heads and the gated layers.

Choices:
- one dense no-grad pass of the frozen model per step through ``bench/capture.py``'s attention
  function; every full-attention call hands its queries and keys (after RoPE) to the trainer,
  which computes the target in query chunks (memory O(chunk x L) per head, never an L x L map
  per layer kept) and the gate's loss with grad on the projections only. Layers with their own
  sliding window (Gemma 3's local layers) are not gated and are listed in the gate file.
- projections start from N(0, 0.02) (the reference's initializer range), seeded by ``seed``;
  AdamW without weight decay at ``lr`` with DuoAttention's schedule here (warm-up from 0.1 x lr
  over the first fifth of the steps, decay over the last fifth); batch 1, every query tile in
  the loss (the reference drops the first quarter of the rows).
- data (``seer_gates.seer_data``): the project's generated long inputs at one ``length`` (the
  fidelity prose, ``niah_single`` and ``variable_tracking`` in turn); sample i comes from
  (seed, i), so the data position is the step and a resumed run sees exactly the data an
  uninterrupted one would. ``seer_gates.write_seer_gates`` writes the gate file.
  Checkpoints hold the projections, the optimiser and scheduler state, the step, the loss
  history, the sliding layers, the timings and torch's RNG state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..backends.masks import BlockLayout, base_token_mask
from ..errors import UsageError
from ..methods.base import knob, validate_knobs
from ..methods.estimators import grouped_scores
from ..methods.seer import gate_logits
from ..profiles import fingerprint
from ..types import AttentionContext, Phase
from .capture import AttentionCall, attention_calls
from .training import FrozenModelTrainer, TrainingKnobs, run_training

CHECKPOINT = "seer-gates.pt"
INIT_STD = 0.02
ROPE_BASE = 10000.0
_BIG = 2**31 - 1
_SCORE_ELEMENTS = 1 << 24  # true attention logits held at once (64 MiB of float32)
_TARGET_TILES = 4  # query tiles per chunk at most: later key tiles of the chunk are skipped


@dataclass
class SeerTraining(TrainingKnobs):
    """The knobs of a gate training run (validated on creation)."""

    name: ClassVar[str] = "seer"
    block_size: int = knob(64, choices=(16, 32, 64, 128, 256), help="tile size the gates pool")
    gate_dim: int = knob(32, choices=(8, 16, 32, 64, 128), help="gate projection size d_gate")
    length: int = knob(2048, low=2, high=_BIG, help="tokens per training sample")
    steps: int = knob(200, low=1, high=_BIG, help="optimisation steps (one sample each)")
    lr: float = knob(1e-3, low=1e-6, high=1.0, help="peak learning rate")
    seed: int = knob(0, low=0, high=_BIG, help="seed of the samples and the initial gates")
    checkpoint_every: int = knob(10, low=1, high=_BIG, help="steps between checkpoints")

    def __post_init__(self) -> None:
        validate_knobs(self)
        if self.length < 2 * self.block_size:
            raise UsageError(
                f"seer: length {self.length} must hold at least two tiles of block_size "
                f"{self.block_size}; otherwise there is nothing to choose"
            )


def call_context(call: AttentionCall) -> AttentionContext:
    """The context of one unpadded training call from position 0 (batch from q)."""
    q, k = call.q, call.k
    return AttentionContext(
        layer_idx=call.layer_idx,
        phase=Phase.PREFILL,
        batch=q.shape[0],
        q_len=q.shape[2],
        kv_len=k.shape[2],
        q_offset=k.shape[2] - q.shape[2],
        kv_offset=0,
        num_q_heads=q.shape[1],
        num_kv_heads=k.shape[1],
        scaling=call.scaling,
        sliding_window=call.window,
        softcap=call.softcap,
        device=q.device,
    )


def tile_max_target(
    q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, layout: BlockLayout
) -> torch.Tensor:
    """(B, Hq, nQ, nK) float32: the true attention max-pooled per tile, rows summing to 1
    over the key tiles (0 on tiles with no visible pair, and on rows that see nothing).

    Exact in float32, in query chunks of whole tiles (memory O(chunk x Lk) per head), each KV
    head's keys shared by its query heads. The largest probability of a row inside a key tile
    is exp(largest logit there - the row's logsumexp), so no probability matrix is formed, and
    a chunk reads no key tile past its last query.
    """
    b, nK, dev = layout.block_size, layout.n_kv_blocks, q.device
    B, Hq = q.shape[:2]
    qs, kf = q.float() * ctx.scaling, k.float()
    rows = max(1, min(_TARGET_TILES, _SCORE_ELEMENTS // max(1, B * Hq * ctx.kv_len * b))) * b
    target = torch.zeros(B, Hq, layout.n_q_blocks, nK, device=dev)
    for start in range(0, ctx.q_len, rows):
        stop = min(start + rows, ctx.q_len)
        last = ctx.q_offset + stop - 1  # causal: no key after the chunk's last query
        seen = min(nK, max(0, (last - ctx.kv_offset) // b + 1))
        if seen == 0:
            continue
        hi = min(seen * b, ctx.kv_len)
        scores = grouped_scores(qs[:, :, start:stop], kf[:, :, :hi])  # (B, Hq, c, hi)
        if ctx.softcap is not None:
            scores = torch.tanh(scores / ctx.softcap) * ctx.softcap
        scores.masked_fill_(~base_token_mask(ctx, start, stop)[..., :hi], float("-inf"))
        lse = torch.logsumexp(scores, -1, keepdim=True)  # (B, Hq, c, 1)
        scores = F.pad(scores, (0, seen * b - hi), value=float("-inf"))
        peak = (scores.view(B, Hq, stop - start, seen, b).amax(-1) - lse).exp()
        peak = peak.nan_to_num_(0.0)  # rows that see nothing (-inf - -inf)
        pad_q = -(stop - start) % b
        peak = F.pad(peak, (0, 0, 0, pad_q)).view(B, Hq, -1, b, seen).amax(3)
        target[:, :, start // b : start // b + peak.shape[2], :seen] = peak
    return target / target.sum(-1, keepdim=True).clamp_min(1e-30)


def gate_kl(logits: torch.Tensor, target: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean over (batch, head, visible query tile) of KL(target || softmax(logits)).

    Args:
        logits: (B, Hq, nQ, nK) gate logits, -inf on invisible tiles.
        target: (B, Hq, nQ, nK) rows summing to 1 (or 0 for a row that sees nothing).
    """
    visible = layout.visible[:, None]  # (B, 1, nQ, nK)
    log_p = torch.log_softmax(logits, -1).masked_fill(~visible, 0.0)
    kl = (torch.xlogy(target, target) - target * log_p).sum(-1)  # (B, Hq, nQ)
    rows = visible.any(-1).expand_as(kl)
    return kl[rows].mean()


class SeerTrainer(FrozenModelTrainer):
    """The gate projections of every layer of one (frozen) model, their optimiser and loss.

    Args:
        model: A transformers causal LM (its weights are not changed; they never get grads).
        config: The run's knobs.
    """

    tensors = ("q_proj", "k_proj")
    checkpoint_file = CHECKPOINT
    progress_label = "seer gates"
    config: SeerTraining
    history: list[float]  # the loss (mean KL) of each step, before it

    def __init__(self, model: torch.nn.Module, config: SeerTraining):
        super().__init__(model, config)
        fp = fingerprint(model.config)
        device = next(model.parameters()).device
        n, features = fp["num_hidden_layers"], 3 * fp["head_dim"]
        g = torch.Generator().manual_seed(config.seed)
        shape_q = (n, fp["num_attention_heads"], features, config.gate_dim)
        shape_k = (n, fp["num_key_value_heads"], features, config.gate_dim)
        self.q_proj = (torch.randn(shape_q, generator=g) * INIT_STD).to(device).requires_grad_()
        self.k_proj = (torch.randn(shape_k, generator=g) * INIT_STD).to(device).requires_grad_()
        self.start_optimiser()

    def gated_layers(self) -> list[int]:
        """The layers whose gates are trained (every layer but the sliding-window ones)."""
        return [i for i in range(self.q_proj.shape[0]) if i not in self.sliding_layers]

    def layer_loss(self, call: AttentionCall) -> torch.Tensor:
        """KL of one layer's gate on one attention call (grad on its projections only)."""
        ctx = call_context(call)
        layout = BlockLayout(ctx, self.config.block_size)
        q, k = call.q.detach(), call.k.detach()
        with torch.no_grad():
            target = tile_max_target(q, k, ctx, layout)
        with torch.enable_grad():
            i = call.layer_idx
            logits = gate_logits(q, k, ctx, layout, self.q_proj[i], self.k_proj[i], ROPE_BASE)
            return gate_kl(logits, target, layout)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """The mean KL over the gated layers on one sample ((1, L) token ids)."""
        losses: list[torch.Tensor] = []

        def on_call(call: AttentionCall) -> None:
            if call.window is not None:  # the layer's own window: not gated
                self.sliding_layers.add(call.layer_idx)
            else:
                losses.append(self.layer_loss(call))

        with torch.no_grad(), attention_calls(self.model, on_call):
            self.decoder(input_ids=ids, use_cache=False)
        if not losses:
            raise UsageError(
                "every attention layer of this model has its own sliding window; "
                "there is no full-attention layer to gate"
            )
        return torch.stack(losses).mean()

    def train_step(self, ids: torch.Tensor) -> float:
        """One optimiser step on one sample; returns the loss before the step."""

        def objective() -> tuple[torch.Tensor, float]:
            loss = self.loss(ids)
            return loss, float(loss.detach())

        return self.optimise(objective)

    def progress_step(self, sample: torch.Tensor) -> dict[str, Any]:
        """One step on ``sample``; the bar shows the KL and the seconds per step."""
        kl = self.train_step(sample)
        return {"kl": f"{kl:.4f}", "s_step": f"{self.seconds / self.step:.1f}"}


def train_seer_gates(
    model: torch.nn.Module,
    data: Callable[[int], torch.Tensor],
    config: SeerTraining,
    **options: Any,
) -> SeerTrainer:
    """Train the gates of ``model`` for ``config.steps`` steps; returns the trainer.

    Args:
        model: A transformers causal LM (frozen and in eval mode for the run; its grad flags
            and mode are restored after).
        data: ``data(i)`` gives sample i as (1, L) token ids.
        config: The run's knobs.
        **options: ``checkpoint`` (folder), ``resume``, ``progress`` (bar), ``on_step``
            (callback): ``training.run_training``'s options, with what it raises.
    """
    return run_training(SeerTrainer(model, config), data, **options)
