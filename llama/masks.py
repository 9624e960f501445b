"""Which keys each query may attend to, and each query's RoPE position: built once per forward.

One function serves training (a right-padded batch), prefill (a left-padded batch written into KV-cache
slots) and decoding (one query at the next slot), with the sliding window of Mistral-style layers.
Keeping it here lets `Llama.forward` read as the network: embed, rotary, layers, norm, head.

Conventions (HF's): a 2-D `attention_mask` (B, S) is 1 for a real token, 0 for padding. A ready mask is
boolean (B, 1, T, S), True = may attend. Queries sit at cache slots `slots` (T,), keys are slots 0..S-1.
Positions count real tokens (cumsum - 1), so a left-padded prompt still starts at position 0. A padded
query row may attend to itself, which keeps it finite (no all-masked softmax row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMasks:
    """The masks of one forward and the queries' RoPE positions.

    full: for full-attention layers; None means plain causal attention over the T queries (SDPA's
      is_causal, which lets it pick flash attention: a mask rules flash out).
    sliding: for sliding-window layers (the same object as `full` when the window cannot bite).
    positions: (B, T) RoPE positions of the queries.
    """

    full: torch.Tensor | None
    sliding: torch.Tensor | None
    positions: torch.Tensor


def attention_masks(*, batch: int, slots: torch.Tensor, n_keys: int, cached: bool = False,
                    attention_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None, window: int | None = None) -> AttentionMasks:
    """Masks and positions for `batch` rows of queries at cache slots `slots` (T,) over `n_keys` keys.

    attention_mask: (B, S) 1/0 per key slot (HF meaning), or None for no padding.
    mask, positions: a ready (B, 1, T, S) boolean mask and its (B, T) positions (generation builds them
      from tables made once per batch); `mask` without `positions` is refused.
    cached: the keys are a KV cache's slots (n_keys of them, beyond the queries), so even without
      padding the causal mask is explicit: SDPA's is_causal assumes the keys start with the queries.
    window: the sliding window (a query at slot q sees slots q-window+1 .. q), None = no sliding layer.
    """
    if mask is not None:
        if positions is None:
            raise ValueError("a ready attention mask needs positions: the RoPE positions of input_ids")
    elif attention_mask is not None:
        real = attention_mask.bool()
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, slots]  # (B, T)
        keys = torch.arange(n_keys, device=slots.device)
        # (B, 1, T, S): causal over slots and key is real; the diagonal keeps pad rows finite.
        mask = ((keys <= slots[:, None]) & real[:, None, :] | (keys == slots[:, None]))[:, None]
    elif cached:
        keys = torch.arange(n_keys, device=slots.device)
        mask = (keys <= slots[:, None])[None, None]
    if positions is None:
        positions = slots[None].expand(batch, slots.numel())
    return AttentionMasks(mask, _sliding(mask, slots=slots, n_keys=n_keys, window=window), positions)


def _sliding(mask: torch.Tensor | None, *, slots: torch.Tensor, n_keys: int,
             window: int | None) -> torch.Tensor | None:
    """`mask` (or plain causal) and key > query - window, as transformers' sliding_window_overlay.

    Slots equal positions for the real tokens of a left- or right-padded row, so the window counts real
    tokens. `mask` itself when there is no window or no key can fall outside it.
    """
    if window is None or n_keys <= window:
        return mask
    keys = torch.arange(n_keys, device=slots.device)
    inside = (keys > slots[:, None] - window)[None, None]  # (1, 1, T, S)
    if mask is None:
        mask = (keys <= slots[:, None])[None, None]
    return mask & inside
