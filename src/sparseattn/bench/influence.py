"""Attention influence for MoA profiling: what masking each attention entry would cost the loss.

MoA (Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model
Compression", arXiv:2406.14909) estimates, to first order, the loss change from masking one
entry A_ij of a head's attention map, with the softmax renormalising the rest of row i:
masking j sets A_ij to 0 and scales every other entry of the row by 1 / (1 - A_ij), so

    E_ij = sum_n dL/dA_in * dA_in = -A_ij (dL/dA_ij - sum_n A_in dL/dA_in) / (1 - A_ij),

and the cost of a sparse pattern is the sum of E over the entries it drops. No L x L map is
stored: one backward pass keeps, per layer, the attention output O and its gradient dO, and
dL/dA_ij = dO_i . v_j, sum_n A_in dL/dA_in = dO_i . O_i, so E is recomputed from (q, k, v, O,
dO) one block of query rows at a time. The gradient is taken with the model frozen, through
transformers' own SDPA attention (``capture.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..methods.estimators import grouped_scores
from .capture import AttentionCall, attention_calls, visible_keys

ROWS_PER_BLOCK = 256  # query rows recomputed at a time
_EPS = torch.finfo(torch.float32).eps


@dataclass
class LayerCapture:
    """One layer's attention in a profiled pass (detached), and the gradient of its output.

    Attributes:
        q: (B, Hq, L, D) queries after RoPE.
        k: (B, Hkv, L, D) keys after RoPE.
        v: (B, Hkv, L, D) values.
        out: (B, L, Hq, D) attention output O.
        grad: (B, L, Hq, D) dL/dO, set during the backward pass.
        scaling: Softmax scale.
        window: The layer's own sliding window (query i sees keys i - window < j <= i), or None.
        softcap: Logit soft-capping, or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    grad: torch.Tensor | None
    scaling: float
    window: int | None
    softcap: float | None


def response_gradients(
    model: nn.Module, ids: torch.Tensor, response: int
) -> tuple[dict[int, LayerCapture], float]:
    """One forward and backward pass; the loss is the mean cross-entropy of the last
    ``response`` tokens of ``ids`` (1, L) given everything before them. Parameters get no
    gradient (the model is frozen). Returns the captures (carrying dL/dO) and the loss."""
    weights = [p for p in model.parameters() if p.requires_grad]
    for p in weights:
        p.requires_grad_(False)
    store: dict[int, LayerCapture] = {}

    def keep(call: AttentionCall) -> None:
        capture = LayerCapture(
            call.q.detach(),
            call.k.detach(),
            call.v.detach(),
            call.out.detach(),
            None,
            call.scaling,
            call.window,
            call.softcap,
        )
        store[call.layer_idx] = capture
        call.out.register_hook(lambda grad: setattr(capture, "grad", grad.detach()))

    try:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # (1, L, hidden)
        with torch.enable_grad(), attention_calls(model, keep):
            out = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=response + 1)
            logits = out.logits[0, :-1]  # (response, V): predicts ids[-response:]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = torch.nn.functional.cross_entropy(logits, ids[0, -response:])
            loss.backward()
    finally:
        for p in weights:
            p.requires_grad_(True)
    missing = [i for i, c in store.items() if c.grad is None]
    if missing:
        raise RuntimeError(f"no gradient reached the attention output of layers {missing}")
    return store, float(loss.detach())


def influence_block(
    capture: LayerCapture, start: int, end: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signed E_ij of query rows [start, end) of batch row 0.

    Returns:
        E (Hq, rows, keys) float32 over the keys those rows can see, the query positions
        (rows,) and the key positions (keys,). Entries a query does not see are 0.
    """
    window = capture.window
    lo = 0 if window is None else max(0, start - window + 1)
    q = capture.q[:1, :, start:end].float()  # (1, Hq, c, D)
    k, v = capture.k[:1, :, lo:end].float(), capture.v[:1, :, lo:end].float()  # (1, Hkv, n, D)
    out = capture.out[:1, start:end].transpose(1, 2).float()  # (1, Hq, c, D)
    grad = capture.grad[:1, start:end].transpose(1, 2).float()  # (1, Hq, c, D)
    logits = grouped_scores(q, k) * capture.scaling  # (1, Hq, c, n)
    if capture.softcap is not None:
        logits = torch.tanh(logits / capture.softcap) * capture.softcap
    rows = torch.arange(start, end, device=q.device)
    keys = torch.arange(lo, end, device=q.device)
    seen = visible_keys(start, end, end, window, q.device)[:, lo:]  # (c, n)
    probs = logits.masked_fill(~seen, float("-inf")).softmax(-1)  # (1, Hq, c, n)
    d_probs = grouped_scores(grad, v)  # (1, Hq, c, n): dL/dA_ij = dO_i . v_j
    row_term = (grad * out).sum(-1, keepdim=True)  # (1, Hq, c, 1): sum_n A_in dL/dA_in
    effect = probs * (row_term - d_probs) / (1.0 - probs).clamp_min(_EPS)
    return effect[0], rows, keys


def influence_matrix(capture: LayerCapture) -> torch.Tensor:
    """(Hq, L, L) signed E of every entry (analysis and tests: small L only)."""
    L = capture.q.shape[2]
    full = torch.zeros(capture.q.shape[1], L, L)
    for start in range(0, L, ROWS_PER_BLOCK):
        effect, rows, keys = influence_block(capture, start, min(L, start + ROWS_PER_BLOCK))
        full[:, rows[0] : rows[-1] + 1, keys[0] : keys[-1] + 1] = effect
    return full


def distance_influence(capture: LayerCapture, sink: int) -> torch.Tensor:
    """(Hkv, L) float64: sum of |E_ij| over the entries at distance d = i - j, keys j >= sink,
    summed over the query heads of each KV head's group.

    A span rule keeping the sink and the last ``span`` keys of every query drops exactly the
    entries with d >= span and j >= sink, so its cost is a tail sum of this histogram.
    """
    Hq, L = capture.q.shape[1], capture.q.shape[2]
    Hkv = capture.k.shape[1]
    hist = torch.zeros(Hq, L, dtype=torch.float64)
    for start in range(0, L, ROWS_PER_BLOCK):
        effect, rows, keys = influence_block(capture, start, min(L, start + ROWS_PER_BLOCK))
        effect = effect.abs().masked_fill(keys[None, None, :] < sink, 0.0)  # the sink is kept
        distance = (rows[:, None] - keys[None, :]).clamp_min(0)  # (c, n); unseen entries are 0
        block = torch.zeros(Hq, L)
        block.scatter_add_(1, distance.reshape(1, -1).expand(Hq, -1), effect.reshape(Hq, -1))
        hist += block.double()
    return hist.view(Hkv, Hq // Hkv, L).sum(1)
