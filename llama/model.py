"""One Llama-family decoder in plain PyTorch, with Hugging Face module names so checkpoints load as a copy.

Module paths equal transformers' `LlamaForCausalLM` (`model.layers.N.self_attn.q_proj`, ...) and, per
family, its `MistralForCausalLM`, `MixtralForCausalLM` (`block_sparse_moe.gate`, `experts.M.w1/w2/w3`),
`GemmaForCausalLM`, `PhiForCausalLM` (`self_attn.dense`, `mlp.fc1/fc2`, `final_layernorm`) and
`Qwen2ForCausalLM`, so `state_dict()` keys are the checkpoint's keys and PEFT adapter keys are
`base_model.model.<path>`. The config's layout fields (llama/config.py: FAMILY_LAYOUTS) switch the few
places the families differ; nothing here reads the family's name, and there is no copy per family.
Every linear is a plain child module called through its own forward (`self.q_proj(x)`), so `quant`
can swap it for a 4-bit module and `lora` can wrap it, with no change here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LlamaConfig
from .masks import AttentionMasks, attention_masks

# enable_gqa lets SDPA broadcast K/V heads without copying them (torch >= 2.5).
_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def rope_inv_freq(cfg: LlamaConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2] in fp32, with the config's rope scaling applied.

    default (RoFormer, Su et al. 2021): f_i = theta^(-2i/d).
    linear (position interpolation, Chen et al. 2023, arXiv:2306.15595): f_i / factor.
    llama3 (Meta's Llama-3.1 `apply_scaling`): with wavelength w_i = 2*pi/f_i and L = original
      context, keep f_i where w_i < L/high_freq_factor, use f_i/factor where w_i > L/low_freq_factor,
      and in between interpolate (1-s)*f_i/factor + s*f_i with s = (L/w_i - low)/(high - low).
    dynamic (NTK-aware, bloc97 2023) depends on the sequence length and is done in `RotaryEmbedding.forward`.
    """
    d = cfg.rotary_dim  # head_dim, or Phi's partial_rotary_factor * head_dim
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
            d, factor, l_max = cfg.rotary_dim, cfg.rope_scaling["factor"], cfg.max_position_embeddings
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
    # x: (B, nh, T, hd); cos/sin: (B, T, rd) broadcast over heads. rd < hd (Phi's partial rotary):
    # only the first rd dims of each head rotate, the rest pass through unchanged.
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos[:, None] + rotate_half(x) * sin[:, None]
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos[:, None] + rotate_half(rot) * sin[:, None], rest), dim=-1)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (Zhang & Sennrich 2019), as HF does.

    offset=True is Gemma's variant: (x / rms(x)) * (1 + weight), all in fp32 before the cast back
    (weights stored around 0). The cast order differs from Llama's as in transformers, so bf16 agrees.
    """

    def __init__(self, dim: int, eps: float = 1e-5, offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: LlamaConfig) -> nn.Module:
    """The family's normalisation: LayerNorm with bias (Phi) or RMSNorm (Gemma's with the +1)."""
    if cfg.norm_type == "layer":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
    return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.norm_offset)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' activation names: silu (SwiGLU), gelu (exact), gelu_new/gelu_pytorch_tanh (tanh)."""
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    return partial(F.gelu, approximate="tanh")


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, (B, n_kv_heads, max_seq_len, head_dim) each.

    `update` writes the new keys/values at cache slots `input_pos` and returns the whole buffers;
    slots not written yet hold zeros and are masked out by the causal mask over slots.
    """

    def __init__(self, batch_size: int, max_seq_len: int, *, n_kv_heads: int, head_dim: int,
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
    """Causal GQA attention with RoPE; full or sliding-window (the mask it is given decides which)."""

    def __init__(self, cfg: LlamaConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        h, b = cfg.hidden_size, cfg.attention_bias
        qkv_b = b or cfg.qkv_bias  # Qwen2: bias on q/k/v but not on o_proj
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=qkv_b)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=qkv_b)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=qkv_b)
        # The output projection under the checkpoint's (and PEFT's target) name: `o_proj`, Phi's `dense`.
        out_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=b)
        self.out_is_dense = cfg.out_proj_name == "dense"
        if self.out_is_dense:
            self.dense = out_proj
        else:
            self.o_proj = out_proj
        self.sliding = cfg.is_sliding(layer)
        self.dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, mask: torch.Tensor | None,
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
        p = self.dropout if self.training else 0.0
        if mask is None and _HAS_GQA:
            # No mask: flash/cuDNN take GQA natively. With a mask, enable_gqa would fall back to the
            # math kernel (O(T^2) memory), so the masked branch below folds the query heads instead.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1, dropout_p=p)
        elif mask is not None and groups > 1:
            # Fold each K/V head's query heads into the query length instead of copying K/V `groups`
            # times: (B, nkv, groups*T, hd) against (B, nkv, S, hd), the mask repeated over the fold.
            # Same products and sums; in decoding it spares a copy of the whole KV cache per layer.
            qf = q.reshape(B, self.n_kv_heads, groups * T, self.head_dim)
            # One query position (a decode step): its mask row broadcasts over the fold, no copy.
            fold_mask = mask if T == 1 else mask.repeat(1, 1, groups, 1)
            y = F.scaled_dot_product_attention(qf, k, v, attn_mask=fold_mask, dropout_p=p)
            y = y.view(B, self.n_heads, T, self.head_dim)
        else:
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p)
        # Looked up at call time: lora.inject and quant swap this child for a wrapped one.
        out_proj = self.dense if self.out_is_dense else self.o_proj
        return out_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)). SwiGLU with silu (Shazeer 2020), GeGLU with
    tanh-GELU (Gemma)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PhiMLP(nn.Module):
    """Phi's plain two-layer MLP with biases: fc2(gelu_tanh(fc1(x)))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixtralExpert(nn.Module):
    """One Mixtral expert, a SwiGLU MLP under the published checkpoints' names: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.w1 = nn.Linear(h, i, bias=False)
        self.w2 = nn.Linear(i, h, bias=False)
        self.w3 = nn.Linear(h, i, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    """The MoE router `gate`: logits = x @ weight.T, one per expert.

    Not an `nn.Linear` on purpose: the loader hook (4-bit) and LoRA's all-linear leave it alone, as
    transformers 5 does (its router is not a linear either). It is tiny (experts x hidden) and routing
    decisions are discrete, so it stays in the compute dtype.
    """

    def __init__(self, hidden: int, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class SparseMoeBlock(nn.Module):
    """Mixtral's sparse mixture of experts (Jiang et al. 2024, arXiv:2401.04088), as transformers.

    Each token goes to the top-k experts by router probability: softmax over all experts in fp32, the
    k largest kept and renormalised to sum 1, cast to the hidden dtype, and the experts' outputs summed
    with those weights. The router logits of the last forward ((B*T, E)) are kept for
    `load_balancing_loss`.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = Router(cfg.hidden_size, cfg.num_local_experts)
        self.experts = nn.ModuleList(MixtralExpert(cfg) for _ in range(cfg.num_local_experts))
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        logits = self.gate(flat)  # (N, E)
        self.router_logits = logits
        weights = logits.float().softmax(dim=-1)
        weights, chosen = weights.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        # One pass per expert over the tokens routed to it (sparse: an expert sees only its tokens).
        hit = torch.zeros(len(self.experts), dtype=torch.bool, device=x.device)
        hit[chosen.flatten()] = True
        for e in hit.nonzero()[:, 0].tolist():
            token, slot = torch.where(chosen == e)
            y = self.experts[e](flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(B, T, H)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, arXiv:2101.03961, eq. 4-6), as Mixtral.

    For E experts: E * sum_e f_e * P_e, where f_e is the number of routing choices (token x top-k)
    sent to expert e per token and P_e the mean router probability of e, over every layer's tokens
    (padding excluded when `attention_mask` (B, T) is given). A perfectly balanced router scores k.
    """
    logits = torch.cat([t.float() for t in router_logits], dim=0)  # (L*N, E)
    n_exp = logits.shape[-1]
    probs = logits.softmax(dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices
    picked = F.one_hot(chosen, n_exp).float()  # (L*N, k, E)
    if attention_mask is None:
        f, p = picked.mean(dim=0), probs.mean(dim=0)
    else:
        w = attention_mask.reshape(-1).float().repeat(len(router_logits))  # (L*N,)
        f = (picked * w[:, None, None]).sum(dim=0) / w.sum()
        p = (probs * w[:, None]).sum(dim=0) / w.sum()
    return (f * p[None]).sum() * n_exp


class LlamaDecoderLayer(nn.Module):
    """One block: attention and feed-forward (MLP, Phi MLP or MoE), sequential or parallel (Phi)."""

    def __init__(self, cfg: LlamaConfig, layer: int = 0) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer)
        self.moe = bool(cfg.num_local_experts)
        if self.moe:
            self.block_sparse_moe = SparseMoeBlock(cfg)
        else:
            self.mlp = LlamaMLP(cfg) if cfg.gated_mlp else PhiMLP(cfg)
        self.input_layernorm = make_norm(cfg)
        self.parallel = cfg.parallel_block
        if not self.parallel:
            self.post_attention_layernorm = make_norm(cfg)
        self.resid_pdrop = cfg.resid_pdrop

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, mask: torch.Tensor | None,
                cache: KVCache | None = None, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        ffn = self.block_sparse_moe if self.moe else self.mlp
        if self.parallel:  # Phi: both branches read the same normed input, summed as transformers does
            h = self.input_layernorm(x)
            a, m = self.self_attn(h, cos, sin, mask=mask, cache=cache, input_pos=input_pos), ffn(h)
            if self.resid_pdrop and self.training:
                a, m = F.dropout(a, self.resid_pdrop), F.dropout(m, self.resid_pdrop)
            return a + m + x
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask=mask, cache=cache, input_pos=input_pos)
        return x + ffn(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack without the head (HF's `model.` prefix)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        # The norm after the last layer under the checkpoint's name: `norm`, Phi's `final_layernorm`.
        self.norm_is_final_layernorm = cfg.final_norm_name == "final_layernorm"
        if self.norm_is_final_layernorm:
            self.final_layernorm = make_norm(cfg)
        else:
            self.norm = make_norm(cfg)
        self.rotary_emb = RotaryEmbedding(cfg)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return (self.final_layernorm if self.norm_is_final_layernorm else self.norm)(x)


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
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_word_embeddings:
            self.tie_weights()
        self.gradient_checkpointing = False
        # The window of the sliding-window layers; None when no layer slides.
        slides = any(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))
        self.sliding_window = cfg.sliding_window if slides else None

    def tie_weights(self) -> None:
        """Share the embedding matrix with the head (one Parameter, two module paths)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def make_kv_caches(self, batch_size: int, max_seq_len: int, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> list[KVCache]:
        emb = self.model.embed_tokens.weight
        cfg = self.config
        return [KVCache(batch_size, max_seq_len, n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                        dtype=dtype or emb.dtype, device=device or emb.device)
                for _ in range(cfg.num_hidden_layers)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                hidden_only: bool = False, kv_caches: list[KVCache] | None = None,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), or the final-normed hidden states (B, T, H) if `hidden_only`.

        attention_mask: (B, T), 1 = real token, 0 = padding (HF meaning); with `kv_caches` it spans all
        S cache slots (B, S) and `input_pos` (T,) gives the slots of `input_ids`. Without padding pass
        None: SDPA then runs causal flash attention. `mask` + `positions` are a ready (B, 1, T, S)
        boolean mask and its RoPE positions (generation builds both from tables made once per batch).
        """
        if kv_caches is not None and input_pos is None:
            raise ValueError("kv_caches needs input_pos: the cache slots of input_ids")
        B, T = input_ids.shape
        slots = input_pos if input_pos is not None else torch.arange(T, device=input_ids.device)
        n_keys = kv_caches[0].k_cache.shape[2] if kv_caches is not None else T
        masks = attention_masks(batch=B, slots=slots, n_keys=n_keys, cached=kv_caches is not None,
                                attention_mask=attention_mask, mask=mask, positions=positions,
                                window=self.sliding_window)
        x = self.embed(input_ids)
        cos, sin = self.model.rotary_emb(masks.positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            cache = kv_caches[i] if kv_caches is not None else None
            x = self._run_layer(layer, x, rope=(cos, sin), masks=masks, cache=cache, input_pos=input_pos)
        x = self.model.final_norm(x)
        return x if hidden_only else self.lm_head(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, scaled (Gemma) and dropped out (Phi, training) as the family does."""
        x = self.model.embed_tokens(input_ids)
        cfg = self.config
        if cfg.embed_scale is not None:  # Gemma: sqrt(hidden), rounded to the embedding dtype as HF does
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        if cfg.embd_pdrop and self.training:
            x = F.dropout(x, cfg.embd_pdrop)
        return x

    def _run_layer(self, layer: LlamaDecoderLayer, x: torch.Tensor, *,
                   rope: tuple[torch.Tensor, torch.Tensor], masks: AttentionMasks, cache: KVCache | None,
                   input_pos: torch.Tensor | None) -> torch.Tensor:
        mask = masks.sliding if layer.self_attn.sliding else masks.full
        if cache is None and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant: works with frozen inputs, LoRA params and 4-bit bases alike.
            return checkpoint(layer, x, *rope, mask=mask, use_reentrant=False)
        return layer(x, *rope, mask=mask, cache=cache, input_pos=input_pos)

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [m for m in self.modules() if isinstance(m, SparseMoeBlock)]

    def router_aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The load-balancing loss of the last forward (Mixtral), unweighted: add
        `config.router_aux_loss_coef * model.router_aux_loss(mask)` to the loss to use it."""
        blocks = self.moe_blocks()
        if not blocks or any(b.router_logits is None for b in blocks):
            raise ValueError("router_aux_loss: the model has no mixture-of-experts layers, or no forward "
                            "has run yet")
        return load_balancing_loss([b.router_logits for b in blocks], self.config.num_experts_per_tok,
                                   attention_mask)
