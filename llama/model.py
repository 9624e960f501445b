"""A Llama decoder in plain PyTorch, with Hugging Face module names so checkpoints load as a copy.

Module paths equal transformers' `LlamaForCausalLM` (`model.layers.N.self_attn.q_proj`, ...), so
`state_dict()` keys are the checkpoint's keys and PEFT adapter keys are `base_model.model.<path>`.
Every linear is a plain child module called through its own forward (`self.q_proj(x)`), so `quant`
can swap it for a 4-bit module and `lora` can wrap it, with no change here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LlamaConfig

# enable_gqa lets SDPA broadcast K/V heads without copying them (torch >= 2.5).
_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def rope_inv_freq(cfg: LlamaConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2] in fp32, with the config's rope scaling applied.

    default (RoFormer, Su et al. 2021): f_i = theta^(-2i/d).
    linear (position interpolation, Chen et al. 2023, arXiv:2306.15595): f_i / factor.
    llama3 (Meta's Llama-3.1 `apply_scaling`): with wavelength w_i = 2*pi/f_i and L = original
      context, keep f_i where w_i < L/high_freq_factor, use f_i/factor where w_i > L/low_freq_factor,
      and in between interpolate (1-s)*f_i/factor + s*f_i with s = (L/w_i - low)/(high - low).
    dynamic (NTK-aware, bloc97 2023) depends on the sequence length and is done in `rope_cos_sin`.
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d))
    kind, s = cfg.rope_type, cfg.rope_scaling or {}
    if kind == "linear":
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, mid))
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Holds the fp32 inverse frequencies (a non-persistent buffer: not in the checkpoint)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def reset(self, device: torch.device | str | None = None) -> None:
        """Recompute the fp32 table on `device` (default: where it is), e.g. after meta-device loading."""
        self.inv_freq = rope_inv_freq(self.cfg, device=device or self.inv_freq.device)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 -- nn.Module's own hook for .to()/.half()/...
        # model.to(bfloat16) would round the frequencies; keep them fp32 (positions up to 1e5 need it).
        super()._apply(fn, recurse)
        self.reset()
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, head_dim] for integer positions [B, T]; computed in fp32, cast to `dtype`."""
        inv_freq = self.inv_freq
        if self.cfg.rope_type == "dynamic":
            # NTK-aware: base' = base * (factor*L/L_max - (factor-1))^(d/(d-2)), L = max(seq len, L_max),
            # with the batch's longest position as seq len (as transformers does). Tensor maths: no sync.
            cfg = self.cfg
            d, factor, l_max = cfg.head_dim, cfg.rope_scaling["factor"], cfg.max_position_embeddings
            seq_len = (positions.max() + 1).clamp(min=l_max).float()
            base = cfg.rope_theta * (factor * seq_len / l_max - (factor - 1)) ** (d / (d - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=positions.device).float() / d))
        freqs = positions[..., None].float() * inv_freq  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # HF rotate-half layout: halves, not interleaved pairs
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos/sin: (B, T, hd) broadcast over heads
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (Zhang & Sennrich 2019), as HF does."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, (B, n_kv_heads, max_seq_len, head_dim) each.

    `update` writes the new keys/values at cache slots `input_pos` and returns the whole buffers;
    slots not written yet hold zeros and are masked out by the causal mask over slots.
    """

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        h, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=b)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=b)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # (B, nkv, S, hd) over all cache slots
            k, v = k.to(q.dtype), v.to(q.dtype)
        groups = self.n_heads // self.n_kv_heads
        if mask is None and _HAS_GQA:
            # No mask: flash/cuDNN take GQA natively. With a mask, enable_gqa would fall back to the
            # math kernel (O(T^2) memory), so there we expand K/V and keep the memory-efficient kernel.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
        elif mask is not None and groups > 1:
            # Fold each K/V head's query heads into the query length instead of copying K/V `groups`
            # times: (B, nkv, groups*T, hd) against (B, nkv, S, hd), the mask repeated over the fold.
            # Same products and sums; in decoding it spares a copy of the whole KV cache per layer.
            qf = q.reshape(B, self.n_kv_heads, groups * T, self.head_dim)
            # One query position (a decode step): its mask row broadcasts over the fold, no copy.
            fold_mask = mask if T == 1 else mask.repeat(1, 1, groups, 1)
            y = F.scaled_dot_product_attention(qf, k, v, attn_mask=fold_mask)
            y = y.view(B, self.n_heads, T, self.head_dim)
        else:
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack without the head (HF's `model.` prefix)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class Llama(nn.Module):
    """Llama causal LM: `model(input_ids, attention_mask)` -> logits (B, T, vocab).

    Positions come from the attention mask (cumsum - 1), so right padding (training) and left
    padding (generation) both rotate real tokens by their true positions. Padded query rows may
    attend to themselves, which keeps them finite (no NaN from an all-masked softmax row).
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.tie_weights()
        self.gradient_checkpointing = False

    def tie_weights(self) -> None:
        """Share the embedding matrix with the head (one Parameter, two module paths)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def make_kv_caches(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> list[KVCache]:
        emb = self.model.embed_tokens.weight
        cfg = self.config
        return [KVCache(batch_size, max_seq_len, cfg.num_key_value_heads, cfg.head_dim,
                        dtype or emb.dtype, device or emb.device) for _ in range(cfg.num_hidden_layers)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                hidden_only: bool = False, *, kv_caches: list[KVCache] | None = None,
                input_pos: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), or the final-normed hidden states (B, T, H) if `hidden_only`.

        attention_mask: (B, T), 1 = real token, 0 = padding (HF meaning). With `kv_caches`, it spans
        all S cache slots (B, S) and `input_pos` (T,) gives the slots of `input_ids`.
        Without padding pass None: SDPA then runs causal flash attention (a mask rules flash out).
        A ready 4-D boolean mask (B, 1, T, S) (True = may attend) is used as is, with `positions`
        (B, T) the RoPE positions: generation builds both from tables made once per batch.
        """
        B, T = input_ids.shape
        slots = input_pos if input_pos is not None else torch.arange(T, device=input_ids.device)
        if kv_caches is not None and input_pos is None:
            raise ValueError("kv_caches needs input_pos: the cache slots of input_ids")
        n_keys = kv_caches[0].k_cache.shape[2] if kv_caches is not None else T
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            if positions is None:
                raise ValueError("a 4-D attention_mask needs positions: the RoPE positions of input_ids")
            mask = attention_mask
        elif attention_mask is not None:
            real = attention_mask.bool()
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, slots]  # (B, T)
            keys = torch.arange(n_keys, device=input_ids.device)
            # (B, 1, T, S): causal over slots and key is real; the diagonal keeps pad rows finite.
            mask = (keys <= slots[:, None]) & real[:, None, :] | (keys == slots[:, None])
            mask = mask[:, None]
        elif kv_caches is not None:
            keys = torch.arange(n_keys, device=input_ids.device)
            mask = (keys <= slots[:, None])[None, None]
        if positions is None:
            positions = slots[None].expand(B, T)

        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            cache = kv_caches[i] if kv_caches is not None else None
            if use_ckpt and cache is None:
                # Non-reentrant: works with frozen inputs, LoRA params and 4-bit bases alike.
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, input_pos)
        x = self.model.norm(x)
        return x if hidden_only else self.lm_head(x)
