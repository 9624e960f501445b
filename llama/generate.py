"""Batched generation with a preallocated KV cache: left-padded prompts, greedy or sampled.

One prefill over the left-padded batch fills every layer's cache, then each decode step feeds one
token per row at the next cache slot. RoPE positions come from the slot mask (cumsum - 1), so a
short prompt padded on the left still starts at position 0. The only Python loop is over decode
steps; `decode_step` has static shapes (the slot is a tensor), so `torch.compile` traces it once.
The model is called only through its forward, so 4-bit and LoRA-wrapped linears work unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .model import KVCache, Llama


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy when temperature <= 0, else a draw after top-k / top-p."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """fp32 logits (B, V) divided by temperature, with tokens outside top-k / top-p set to -inf.

    Applied in transformers' order (temperature, top-k, top-p). Top-p (nucleus sampling, Holtzman
    et al. 2019) keeps the most likely tokens until their mass reaches p, and always the first.
    """
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        drop = mass_before >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): argmax if temperature <= 0, else a seeded draw."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def decode_step(model: Llama, tokens: torch.Tensor, *, attention_mask: torch.Tensor,
                kv_caches: list[KVCache], input_pos: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) of the last position of `tokens` (B, T) written at cache slots `input_pos`."""
    hidden = model(tokens, attention_mask=attention_mask, hidden_only=True, kv_caches=kv_caches,
                   input_pos=input_pos)
    return model.lm_head(hidden[:, -1]).float()


def _decode_one(model: Llama, token: torch.Tensor, *, real: torch.Tensor, positions: torch.Tensor,
                keys: torch.Tensor, kv_caches: list[KVCache], slot: torch.Tensor) -> torch.Tensor:
    """One decode step from the per-batch tables: fp32 logits (B, V) of `token` (B, 1) at `slot` (1,).

    `real` (B, S) marks the cache slots holding real tokens and `positions` (B, S) their RoPE
    positions, both made once per batch; the step's mask row is one comparison with `keys` (S,).
    Static shapes, no Python branching on values: it compiles with fullgraph=True, once per batch size.
    """
    mask = (real & (keys <= slot))[:, None, None, :]  # (B, 1, 1, S): causal over slots, real keys only
    pos = positions.index_select(1, slot)  # (B, 1)
    hidden = model(token, mask=mask, positions=pos, hidden_only=True, kv_caches=kv_caches, input_pos=slot)
    return model.lm_head(hidden[:, -1]).float()


def compiled_decode_step(device: torch.device) -> Callable[..., torch.Tensor]:
    """The decode step under torch.compile(fullgraph=True); CUDA graphs ("reduce-overhead") on CUDA."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(_decode_one, fullgraph=True, dynamic=False, mode=mode)


def generate_ids(model: Llama, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, eos_id: int | Sequence[int] | None = None,
                 pad_id: int | None = None, batch_size: int | None = None,
                 stop_fn: Callable[[list[int]], bool] | None = None,
                 compile: bool = False, check_every: int = 8,
                 progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """New token ids for each prompt, up to (not including) the first EOS.

    eos_id: one id or several; None = the model config's; [] = never stop early.
    pad_id: fills the left padding (masked, so any valid id; default config pad id or 0).
    batch_size: prompts per batch (None = all at once); prompts are grouped by length.
    stop_fn(new_ids) -> True ends that row (its tokens are kept; `generate` trims stop strings).
    seed: sampling is reproducible for a given seed, batch composition and device.
    compile: torch.compile the decode step (fullgraph; CUDA graphs on CUDA).
    check_every: decode steps between looks at the device's state (finished rows, stop_fn): the host
      waits for the device only then, not at every token. Greedy results do not depend on it
      (sampled ones do: the batch shrinks at other steps, so the draws are made in other shapes).
    progress(n): called after each batch with its number of prompts.
    """
    cfg = model.config
    eos = cfg.eos_token_ids if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    pad = pad_id if pad_id is not None and pad_id >= 0 else (cfg.pad_token_id or 0)
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate_ids: every prompt needs at least one token (e.g. BOS)")
    if check_every < 1:
        raise ValueError(f"generate_ids: check_every must be >= 1, got {check_every}")
    if not prompt_ids:
        return []
    device = model.model.embed_tokens.weight.device
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    step_fn = compiled_decode_step(device) if compile else _decode_one
    sampling = Sampling(temperature, top_k, top_p)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    batch_size = batch_size or len(order)
    # One cache length for every batch of the call (rounded up to 64 slots), so a compiled step
    # keeps its shapes from batch to batch; each batch's prompts end where its decoding starts.
    longest = max(len(p) for p in prompt_ids)
    slots = -(-(longest + max_new_tokens) // 64) * 64
    results: list[list[int]] = [[] for _ in prompt_ids]
    was_training = model.training
    model.eval()  # no LoRA dropout while generating
    # batch sizes halve as rows finish (16, 8, 4, 2, 1) and the last batch may be smaller: a graph each
    limit: Any = contextlib.nullcontext()
    if compile:  # the knob's name before torch 2.6 was cache_size_limit
        knob = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        limit = torch._dynamo.config.patch(**{knob: max(getattr(torch._dynamo.config, knob), 32)})
    try:
        with torch.no_grad(), limit:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                new = _generate_batch(model, [list(prompt_ids[i]) for i in rows],
                                      max_new_tokens=max_new_tokens, sampling=sampling, generator=generator,
                                      eos=eos, pad=pad, stop_fn=stop_fn, step_fn=step_fn, slots=slots,
                                      check_every=check_every)
                for i, ids in zip(rows, new):
                    results[i] = ids
                if progress is not None:
                    progress(len(rows))
    finally:
        model.train(was_training)
    return results


def _generate_batch(model: Llama, prompts: list[list[int]], *, max_new_tokens: int, sampling: Sampling,
                    generator: torch.Generator | None, eos: list[int], pad: int,
                    stop_fn: Callable[[list[int]], bool] | None, step_fn: Callable[..., torch.Tensor],
                    slots: int, check_every: int) -> list[list[int]]:
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    device = model.model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    S = max(slots, P + max_new_tokens)
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], device=device)
    # Per-batch tables, made once: which slots hold real tokens (left padding is not; generated
    # slots P.. are), and every slot's RoPE position (cumsum - 1 over real slots).
    real = torch.ones(B, S, dtype=torch.bool)
    real[:, :P] = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
    real = real.to(device)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    keys = torch.arange(S, device=device)
    cache_dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                   else model.model.embed_tokens.weight.dtype)
    caches = model.make_kv_caches(B, S, dtype=cache_dtype, device=device)
    if device.type == "cuda":  # CUDA graphs: the caches are updated in place at fixed addresses
        for c in caches:
            torch._dynamo.mark_static_address(c.k_cache, guard=False)
            torch._dynamo.mark_static_address(c.v_cache, guard=False)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)

    # Prefill: one forward over the prompts, logits only at the last slot.
    logits = decode_step(model, ids, attention_mask=real.long(), kv_caches=caches,
                         input_pos=torch.arange(P, device=device))
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    live = torch.arange(B, device=device)  # row of `out` that each row of the running batch fills
    slot = torch.full((1,), P - 1, dtype=torch.long, device=device)  # advanced in place: no upload per step
    stopped_at: dict[int, int] = {}  # row -> tokens kept when stop_fn fired
    checked = 0  # steps whose tokens stop_fn has seen
    step = 0
    for step in range(max_new_tokens):
        nxt = sample(logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                     generator=generator)
        nxt = torch.where(done, pad, nxt)  # a finished row (kept to fill a batch size) writes padding
        out[live, step] = nxt
        done |= torch.isin(nxt, eos_t)
        if step == max_new_tokens - 1:
            break
        if (step + 1) % check_every == 0:
            # The only place the host waits for the device: every `check_every` steps.
            if stop_fn is not None:
                _apply_stop_fn(out, live, done, stop_fn=stop_fn, checked=checked, upto=step + 1,
                               stopped_at=stopped_at)
                checked = step + 1
            finished = done.tolist()
            if all(finished):
                break
            keep = _rows_to_keep(finished)
            if keep is not None:  # finished rows stop costing: the batch shrinks to a power of two
                sel = torch.tensor(keep, device=device)
                for c in caches:
                    c.k_cache, c.v_cache = c.k_cache.index_select(0, sel), c.v_cache.index_select(0, sel)
                    if device.type == "cuda":
                        torch._dynamo.mark_static_address(c.k_cache, guard=False)
                        torch._dynamo.mark_static_address(c.v_cache, guard=False)
                real, positions, done, live, nxt = (t.index_select(0, sel) for t in (real, positions, done,
                                                                                     live, nxt))
        slot += 1
        logits = step_fn(model, nxt[:, None], real=real, positions=positions, keys=keys, kv_caches=caches,
                         slot=slot)
    if stop_fn is not None and checked < step + 1:
        _apply_stop_fn(out, torch.arange(B, device=device), torch.zeros(B, dtype=torch.bool, device=device),
                       stop_fn=stop_fn, checked=checked, upto=step + 1, stopped_at=stopped_at)

    result = []
    for r, row in enumerate(out[:, :step + 1].tolist()):
        cut = next((j for j, t in enumerate(row) if t in eos), len(row))
        result.append(row[:min(cut, stopped_at.get(r, cut))])
    return result


def _apply_stop_fn(out: torch.Tensor, live: torch.Tensor, done: torch.Tensor, *,
                   stop_fn: Callable[[list[int]], bool], checked: int, upto: int,
                   stopped_at: dict[int, int]) -> None:
    """Ask `stop_fn` about every prefix made since the last look; mark the rows it ends as done.

    Each prefix is asked about once, in order, so the result is what a per-step check would give.
    """
    rows, finished = live.tolist(), done.tolist()
    tokens = out[rows, :upto].tolist()
    for i, (r, row) in enumerate(zip(rows, tokens)):
        if finished[i] or r in stopped_at:
            continue
        for n in range(checked + 1, upto + 1):
            if stop_fn(row[:n]):
                stopped_at[r] = n
                done[i] = True
                break


def _rows_to_keep(finished: list[bool]) -> list[int] | None:
    """Rows of the running batch to keep when the live ones fit in a smaller power of two, else None.

    All live rows, topped up with finished ones to that power of two, so a compiled step sees only a
    few batch sizes (the first, then 8, 4, 2, 1) and the caches are copied at most log2(B) times.
    """
    n, alive = len(finished), [i for i, f in enumerate(finished) if not f]
    size = 1 << max(len(alive) - 1, 0).bit_length()
    if size >= n:
        return None
    filler = [i for i, f in enumerate(finished) if f][:size - len(alive)]
    return sorted(alive + filler)


def generate(model: Llama, tok: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
             stop: str | Sequence[str] | None = None, batch_size: int = 8, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_at_eos: bool = True, compile: bool = False) -> list[str]:
    """The generated text of each prompt (only the new text; a stop string and what follows removed).

    Prompts are encoded with BOS; generation stops at EOS (tokenizer's and config's) unless
    `stop_at_eos` is False, at any of `stop`, or after `max_new_tokens`.
    """
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    eos = sorted({tok.eos_id, *model.config.eos_token_ids} - {None}) if stop_at_eos else []
    stop_fn = (lambda new: any(s in tok.decode(new) for s in stops)) if stops else None
    ids = generate_ids(model, [tok.encode(p, bos=True, eos=False) for p in prompts],
                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, eos_id=eos, pad_id=tok.pad_id, batch_size=batch_size,
                       stop_fn=stop_fn, compile=compile)
    texts = []
    for new in ids:
        text = tok.decode(new)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
        texts.append(text[:cut])
    return texts
