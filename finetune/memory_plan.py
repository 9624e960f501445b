"""``train.py CONFIG --plan``: what a run will hold per rank, from config.json alone, before any weight loads.

Why a plan at all: a 70B QLoRA run that runs out of memory does so after minutes of streaming weights;
the arithmetic can say so in a second. The model is built as a meta-device skeleton (no memory, no
weights) with LoRA injected exactly as ``finetune.modeling.load_model`` does, and
``quant.estimate_memory`` states the 4-bit bytes from shapes; the same skeleton gives the LoRA,
gradient and AdamW bytes. Those figures equal the real tensors byte for byte
(``tests/finetune/test_memory_plan.py`` builds the real model and sums them).

Activations are a model of what autograd keeps, written from how ``llama/model.py``, ``lora/layer.py``,
``quant/linear.py`` and ``finetune/run/loss.py`` compute (see ``activation_bytes``); the test measures
the real peak of a CPU forward+backward and requires 25% agreement. They assume every row is
``data.max_length`` tokens (no padding, so no attention mask: SDPA's flash path) and that every
position is a target: the worst case of a micro-batch, which is what "does it fit" needs.

Layouts, per rank: single (one GPU); DDP (everything replicated, plus DDP's gradient buckets, which
``finetune.run.loop._wrap_ddp`` leaves as a separate copy of the gradients); FSDP as FSDP2
(``fully_shard`` per decoder layer and on the root) would hold it: every parameter, gradient and AdamW
state divided over the ranks, the 4-bit quantisation state sharded with its rows (absmax scales
travel with the blocks they scale), plus the all-gathered root (embeddings, head, final norm: FSDP2
does not reshard the root after forward) and two decoder layers unsharded at a time (the one computing
and the one prefetched). FSDP is not implemented in the loop yet; its column is the arithmetic.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.config import RunConfig
from finetune.errors import UserError

GiB = 2**30
# CUDA context, cuBLAS/flash workspaces and the caching allocator's fragmentation: not tensors, so no
# sum of tensor bytes sees them, but a 24 GiB card never gives 24 GiB of tensors.
RESERVE = GiB
_UNITS = {"": None, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """``24GiB`` / ``80GB`` / ``24G`` / ``81559MiB`` -> bytes; a bare number is refused (24 what?).

    GB is decimal (10^9) and GiB binary (2^30), as the SI and IEC say; a lone G means GiB, as
    nvidia-smi's sizes do.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text or "")
    unit = _UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None or float(m.group(1)) <= 0:
        raise UserError(f"--gpu-memory {text!r}: cannot read a memory size; give a number and a unit, "
                        "e.g. --gpu-memory 24GiB (or 80GB, 40G, 81559MiB)")
    return int(float(m.group(1)) * unit)


def size(n: float) -> str:
    """Bytes as the plan prints them (GiB with two decimals above 1 GiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------------------
# weights, LoRA, gradients, optimizer: exact, from the meta skeleton


@dataclass(frozen=True)
class StaticBytes:
    """Bytes that do not depend on the batch, on one rank holding everything (the single layout).

    quantized: 4-bit codes + quantisation statistics (absmax, code tables, offset), what bitsandbytes
    stores. dense: frozen parameters kept in a float dtype plus buffers (RoPE table). lora: the
    trainable parameters; grads: their ``.grad`` (same dtype); optimizer: every tensor in the
    optimizer's state after a step (for AdamW: exp_avg, exp_avg_sq and a 4-byte ``step`` per tensor);
    optimizer_8bit: what bitsandbytes' 8-bit AdamW would hold instead (the plan's first advice when
    the optimizer is what overflows).
    layer_unsharded / root_unsharded: one decoder layer's and the non-layer parameters' bytes, what an
    FSDP all-gather materialises. params: the base model's parameter count (LoRA not included).
    """

    quantized: int
    dense: int
    lora: int
    grads: int
    optimizer: int
    lora_tensors: int
    optimizer_8bit: int
    layer_unsharded: int
    root_unsharded: int
    params: int


def build_skeleton(cfg: RunConfig, dtype: torch.dtype) -> tuple[Any, Any]:
    """The run's model on the meta device: (skeleton with LoRA injected, its LlamaConfig).

    Dtypes follow ``finetune.modeling.load_model``: frozen weights in the compute dtype (fp32 for full
    training), LoRA in fp32.
    """
    import llama
    import lora

    lcfg = llama.LlamaConfig.from_hf(cfg.model.path)
    with torch.device("meta"):
        model = llama.Llama(lcfg)
    full_training = not cfg.lora.enabled
    model.to(torch.float32 if full_training else dtype)
    if cfg.lora.enabled:
        lo = cfg.lora
        lora.inject(model, targets=lo.targets, r=lo.r, alpha=lo.alpha, dropout=lo.dropout,
                    use_rslora=lo.use_rslora)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model, lcfg


def static_bytes(cfg: RunConfig, model: Any, dtype: torch.dtype) -> StaticBytes:
    """Weights, LoRA, gradients and optimizer state of ``model`` (a meta skeleton) as the run stores them."""
    import quant

    quantized = cfg.quant.enabled or cfg.model.prequantized is not None
    if quantized:
        qc = quant.QuantConfig(quant_type=cfg.quant.quant_type, double_quant=cfg.quant.double_quant,
                               blocksize=cfg.quant.blocksize, compute_dtype=dtype, skip=tuple(cfg.quant.skip))
        rep = quant.estimate_memory(model, qc)
    else:
        qc, rep = None, None
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_bytes = sum(p.numel() * p.element_size() for p in trainable)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    if rep is not None:
        q, dense = rep.quantized_bytes + rep.quant_stats_bytes, rep.dense_bytes + buffers
    else:
        q = 0
        dense = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                    if not p.requires_grad) + buffers
    # FSDP's units: the root (everything outside the decoder layers: embeddings, head, final norm, RoPE
    # table; never quantised, the 4-bit targets are inside model.layers) and one decoder layer.
    in_layers = {id(p) for p in model.model.layers.parameters()}
    root = sum(t.numel() * t.element_size() for t in [*{id(p): p for p in model.parameters()}.values(),
                                                       *model.buffers()] if id(t) not in in_layers)
    layers = len(model.model.layers)
    return StaticBytes(quantized=q, dense=dense, lora=lora_bytes, grads=lora_bytes,
                       optimizer=optimizer_bytes(trainable, cfg.train.optimizer),
                       lora_tensors=len(trainable), optimizer_8bit=optimizer_bytes(trainable, "adamw8bit"),
                       layer_unsharded=-(-(q + dense + lora_bytes - root) // layers), root_unsharded=root,
                       params=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()
                                  if not (cfg.lora.enabled and p.requires_grad)))


def optimizer_bytes(params: list[Any], kind: str) -> int:
    """What the optimizer's state holds after its first step.

    torch AdamW: exp_avg and exp_avg_sq like each parameter, and ``step`` as a 4-byte fp32 scalar tensor
    per parameter. bitsandbytes' 8-bit AdamW: for tensors of >= 4096 elements two uint8 states plus one
    fp32 absmax per 256-element block each (below that it keeps 32-bit states), and a step counter on the
    optimizer, not per tensor.
    """
    total = 0
    for p in params:
        n = p.numel()
        if kind == "adamw":
            total += 2 * n * p.element_size() + 4
        elif n >= 4096:
            total += 2 * (n + 4 * -(-n // 256))
        else:
            total += 2 * 4 * n
    return total


# ---------------------------------------------------------------------------------------------------
# activations: a model of what autograd keeps


@dataclass(frozen=True)
class ActivationBytes:
    """Peak bytes above the weights of one micro-batch's forward+backward, with and without checkpointing.

    saved_*: what stays for backward once the forward is done; peak_*: that plus the largest transient
    of the backward (the CE chunk, or one recomputed layer and its gradients); ce_chunk: the transient of
    one cross-entropy chunk's backward (fp32 log-probabilities and two gradients of their size).
    """

    batch: int
    seq: int
    saved_plain: int
    saved_checkpointed: int
    peak_plain: int
    peak_checkpointed: int
    ce_chunk: int
    ce_rows: int

    def peak(self, checkpointing: bool) -> int:
        return self.peak_checkpointed if checkpointing else self.peak_plain


@dataclass(frozen=True)
class ModelShape:
    """The shapes the activation model needs (from the LlamaConfig and the injected skeleton)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts_per_token: int  # 0 = dense MLP
    gated: bool  # SwiGLU/GeGLU (three projections) rather than Phi's fc1/fc2
    parallel: bool  # Phi: one norm, attention and MLP side by side
    lora_in: dict[str, int] = field(default_factory=dict)  # LoRA'd linear in layer 0 -> in_features
    lora_r: int = 0
    dropout: bool = False
    full: bool = False  # full training: every weight trainable, so every linear keeps its input


def model_shape(model: Any, lcfg: Any, cfg: RunConfig) -> ModelShape:
    from lora.layer import LoRALinear

    layer0 = model.model.layers[0]
    lora_in = {name: m.in_features for name, m in layer0.named_modules() if isinstance(m, LoRALinear)}
    return ModelShape(hidden=lcfg.hidden_size, intermediate=lcfg.intermediate_size,
                      layers=lcfg.num_hidden_layers, heads=lcfg.num_attention_heads,
                      kv_heads=lcfg.num_key_value_heads, head_dim=lcfg.head_dim, vocab=lcfg.vocab_size,
                      experts_per_token=lcfg.num_experts_per_tok if lcfg.num_local_experts else 0,
                      gated=not lcfg.parallel_block, parallel=lcfg.parallel_block, lora_in=lora_in,
                      lora_r=cfg.lora.r if cfg.lora.enabled else 0,
                      dropout=cfg.lora.enabled and cfg.lora.dropout > 0, full=not cfg.lora.enabled)


def activation_bytes(shape: ModelShape, *, batch: int, seq: int, ce_chunk_size: int, act: int,
                     mask: int) -> ActivationBytes:
    """Bytes autograd keeps for one micro-batch of ``batch`` rows of ``seq`` tokens.

    ``act`` is the activation dtype's size (2 under bf16 autocast, 4 in fp32), ``mask`` a dropout mask
    element (1: CUDA's fused dropout keeps a bool mask; on CPU the scaled noise in the input's dtype).
    Per token of one decoder layer, from the code:
    - each RMSNorm keeps its input in fp32 (``x.float()``) and the normalised value (cast back); in
      layer 0 the input (the frozen embedding's output) needs no gradient, so that norm keeps nothing
      and the dropout of the LoRA branches it feeds keeps no mask;
    - a 4-bit base keeps nothing (``quant.linear`` saves only the packed weight); each LoRA'd linear
      keeps its dropout output and mask (or, without dropout, its input) and the rank-r ``lora_A``
      output;
    - attention keeps the roped q and k, v, the output and fp32 log-sum-exp (flash SDPA, no mask);
    - a gated MLP keeps gate, act(gate) and up (3 x intermediate); Phi's keeps fc1's output; an MoE
      token does that in each of its top-k experts, plus its gathered input;
    - outside the layers: RoPE cos/sin, the final norm, the hidden states and the target rows that
      feed the chunked CE (all positions counted as targets).
    With checkpointing each layer keeps only its input; its backward then recomputes one layer. The
    transient of a layer's backward (gradients in flight) is taken as intermediate + hidden: measured
    on CPU, the backward frees a layer's saved tensors about as fast as it makes gradients.
    """
    s, f, h, i = act, 4, shape.hidden, shape.intermediate
    q_out, kv_out = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim

    def lora(name_end: str) -> int:
        names = [n for n in shape.lora_in if n.split(".")[-1] == name_end]
        if not names:
            return 0
        d_in = shape.lora_in[names[0]]
        kept = d_in * (s + mask) if shape.dropout else 0  # dropout output + mask (else the input, below)
        return len(names) * (kept + shape.lora_r * s)

    def undropped_input(*ends: str) -> bool:
        """Whether these linears' shared input is kept: for a weight gradient (full training), or by a
        LoRA branch without dropout (a frozen base alone keeps nothing: its weight needs no gradient)."""
        return shape.full or (not shape.dropout and any(n.split(".")[-1] in ends for n in shape.lora_in))

    norm = h * (f + s)
    attn = lora("q_proj") + lora("k_proj") + lora("v_proj") + s * (2 * q_out + 2 * kv_out) + f * shape.heads
    attn += lora("o_proj") + lora("dense")
    attn += h * s if undropped_input("q_proj", "k_proj", "v_proj") else 0
    attn += q_out * s if undropped_input("o_proj", "dense") else 0
    if shape.experts_per_token:
        k = shape.experts_per_token
        def one_expert(end: str) -> int:  # a token visits k experts, not all of the LoRA'd ones
            return lora(end) // max(sum(n.split(".")[-1] == end for n in shape.lora_in), 1)

        mlp = k * (3 * i * s + h * s + one_expert("w1") + one_expert("w3") + one_expert("w2")
                   + (i * s if shape.full else 0))
    elif shape.gated:
        mlp = 3 * i * s + lora("gate_proj") + lora("up_proj") + lora("down_proj")
        mlp += h * s if undropped_input("gate_proj", "up_proj") else 0
        mlp += i * s if undropped_input("down_proj") else 0
    else:
        # the GELU keeps fc1's output; fc2's input only when something needs it
        mlp = i * s + lora("fc1") + lora("fc2") + (i * s if undropped_input("fc2") else 0)
    layer = (norm if shape.parallel else 2 * norm) + attn + mlp
    # Layer 0's input (the frozen embedding's output) needs no gradient: its first norm keeps nothing,
    # and dropout on what that norm feeds records no mask.
    first_feeds = ("q_proj", "k_proj", "v_proj") + (("gate_proj", "up_proj", "fc1") if shape.parallel else ())
    masks = sum(d_in * mask for n, d_in in shape.lora_in.items() if n.split(".")[-1] in first_feeds)
    layer0 = layer if shape.full else layer - norm - (masks if shape.dropout else 0)
    rope = 2 * shape.head_dim * s
    final = norm + 2 * h * s  # final norm; the hidden states and the target rows gathered from them
    back = i * s + h * s  # the gradients in flight while a layer's own saved tensors are being freed

    tokens = batch * seq
    rows = min(ce_chunk_size, tokens)
    logits = shape.vocab * rows
    # The chunk's backward recomputes the logits; their fp32 copy goes into log_softmax, which keeps only
    # its fp32 output; then the gradients of the log-probabilities and of the logits: three fp32 tensors
    # of chunk x vocab at once (measured on CPU in fp32 and under bf16 autocast alike).
    ce = logits * 3 * f
    saved_plain = tokens * ((shape.layers - 1) * layer + layer0 + rope + final)
    saved_ckpt = tokens * (shape.layers * h * s + rope + final)
    return ActivationBytes(batch=batch, seq=seq, saved_plain=saved_plain, saved_checkpointed=saved_ckpt,
                           peak_plain=saved_plain + max(ce, tokens * back),
                           peak_checkpointed=saved_ckpt + max(ce, tokens * (layer + back)),
                           ce_chunk=ce, ce_rows=rows)


# ---------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Layout:
    """One column of the plan: how many ranks, and what each of them holds."""

    name: str
    ranks: int
    quantized: int
    dense: int
    lora: int
    grads: int
    optimizer: int
    comm: int  # DDP's gradient buckets, or FSDP's all-gathered units
    comm_what: str

    @property
    def static(self) -> int:
        return self.quantized + self.dense + self.lora + self.grads + self.optimizer + self.comm


@dataclass(frozen=True)
class Verdict:
    """Whether a layout fits at the configured micro-batch, the largest that fits, and what to change."""

    total: int
    fits: bool
    largest_micro_batch: int  # 0 = not even one row of data.max_length
    advice: str


@dataclass(frozen=True)
class MemoryPlan:
    """Everything ``--plan`` prints; built from config.json and the run config alone."""

    name: str
    model_type: str
    params: int
    micro_batch: int
    seq: int
    checkpointing: bool
    dtype: str
    quant: str
    lora: str
    gpu_memory: int
    gpu_memory_note: str
    static: StaticBytes
    activations: ActivationBytes
    layouts: list[Layout]
    verdicts: list[Verdict]
    kv_cache: int
    kv_tokens: int
    eval_batch: int
    vocab: int
    optimizer: str
    eval_fits: bool  # eval.py on one GPU: the weights (4-bit base + dense + adapter) and the KV cache


def make_layouts(st: StaticBytes, gpus: int) -> list[Layout]:
    """single, and (with more than one GPU) DDP and FSDP over ``gpus`` ranks."""
    layouts = [Layout("single", 1, st.quantized, st.dense, st.lora, st.grads, st.optimizer, 0, "")]
    if gpus > 1:
        layouts.append(Layout(f"DDP x{gpus}", gpus, st.quantized, st.dense, st.lora, st.grads, st.optimizer,
                              st.grads, "DDP gradient buckets"))

        def shard(n: int) -> int:
            return -(-n // gpus)

        gathered = st.root_unsharded + 2 * st.layer_unsharded
        layouts.append(Layout(f"FSDP x{gpus}", gpus, shard(st.quantized), shard(st.dense), shard(st.lora),
                              shard(st.grads), shard(st.optimizer), gathered,
                              "FSDP all-gathered root + 2 layers"))
    return layouts


def make_plan(cfg: RunConfig, *, gpus: int = 1, gpu_memory: int | None = None, device: str = "cuda"
              ) -> MemoryPlan:
    """The plan of ``cfg`` on ``gpus`` GPUs of ``gpu_memory`` bytes (None: the visible GPU's, else 24 GiB).

    ``device="cpu"`` plans a CPU run instead (fp32 everywhere, CPU dropout masks): what the tests
    compare with real CPU allocations.
    """
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: must be >= 1")
    check_model_dir(cfg.model.path)
    from finetune import preflight

    preflight.check_max_length(cfg.data.max_length, cfg.model.path)  # the run refuses it, so the plan does
    if device == "cpu":
        dtype, mask = torch.float32, 4
    else:
        dtype, mask = getattr(torch, cfg.model.dtype), 1
    note = ""
    if gpu_memory is None:
        if torch.cuda.is_available():
            gpu_memory = torch.cuda.get_device_properties(0).total_memory
            note = f"({torch.cuda.get_device_name(0)})"
        else:
            gpu_memory, note = 24 * GiB, "(assumed: no GPU visible; pass --gpu-memory)"
    model, lcfg = build_skeleton(cfg, dtype)
    st = static_bytes(cfg, model, dtype)
    shape = model_shape(model, lcfg, cfg)
    act_size = torch.tensor([], dtype=dtype).element_size()
    seq, mb, ckpt = cfg.data.max_length, cfg.train.micro_batch_size, cfg.model.gradient_checkpointing

    def acts(batch: int) -> ActivationBytes:
        return activation_bytes(shape, batch=batch, seq=seq, ce_chunk_size=cfg.train.ce_chunk_size,
                                act=act_size, mask=mask)

    layouts = make_layouts(st, gpus)
    verdicts = [verdict(lay, st, acts, mb=mb, ckpt=ckpt, memory=gpu_memory, cfg=cfg) for lay in layouts]
    kv_tokens = seq + cfg.eval.max_new_tokens
    kv = cfg.eval.batch_size * kv_tokens * lcfg.num_hidden_layers * 2 * lcfg.num_key_value_heads \
        * lcfg.head_dim * act_size
    dq = " + double quant" if cfg.quant.double_quant else ""
    qdesc = (f"{cfg.quant.quant_type.upper()}{dq}, blocksize {cfg.quant.blocksize}"
             if cfg.quant.enabled or cfg.model.prequantized else "none (dense base)")
    targets = cfg.lora.targets if isinstance(cfg.lora.targets, str) else ",".join(cfg.lora.targets)
    ldesc = f"r={cfg.lora.r} on {targets}" if cfg.lora.enabled else "off (full training)"
    return MemoryPlan(name=Path(cfg.model.path).name, model_type=lcfg.model_type, params=st.params,
                      micro_batch=mb, seq=seq, checkpointing=ckpt, dtype=str(dtype).removeprefix("torch."),
                      quant=qdesc, lora=ldesc, gpu_memory=gpu_memory, gpu_memory_note=note, static=st,
                      activations=acts(mb), layouts=layouts, verdicts=verdicts, kv_cache=kv,
                      kv_tokens=kv_tokens, eval_batch=cfg.eval.batch_size, vocab=lcfg.vocab_size,
                      optimizer=cfg.train.optimizer,
                      eval_fits=st.quantized + st.dense + st.lora + kv + RESERVE <= gpu_memory)


def verdict(lay: Layout, st: StaticBytes, acts: Any, *, mb: int, ckpt: bool, memory: int, cfg: RunConfig
            ) -> Verdict:
    """Fit at the configured micro-batch; the largest that fits; the first thing to change otherwise."""
    budget = memory - RESERVE
    total = lay.static + acts(mb).peak(ckpt)

    def largest(checkpointing: bool) -> int:
        lo, hi = 0, 1
        while lay.static + acts(hi).peak(checkpointing) <= budget and hi < 1 << 16:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # activations grow with the batch: bisect for the last that fits
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if lay.static + acts(mid).peak(checkpointing) <= budget else (lo, mid)
        return lo

    best = largest(ckpt)
    fits = total <= budget
    if fits:
        advice = "" if best == mb else f"fits; micro-batch up to {best} would too"
    elif lay.static > budget:
        advice = _too_big(lay, st, acts, budget=budget, cfg=cfg)
    elif best >= 1:
        accum = cfg.train.gradient_accumulation_steps * mb / best
        advice = (f"set train.micro_batch_size: {best} (and gradient_accumulation_steps: {math.ceil(accum)} "
                  "to keep the global batch)")
        if not ckpt and largest(True) >= mb:
            advice += f", or model.gradient_checkpointing: true (then micro-batch {mb} fits)"
    elif not ckpt and largest(True) >= 1:
        advice = "set model.gradient_checkpointing: true"
    else:
        advice = f"lower data.max_length (now {cfg.data.max_length}) or train.ce_chunk_size"
        if not ckpt:
            advice = "set model.gradient_checkpointing: true and " + advice
    return Verdict(total=total, fits=fits, largest_micro_batch=best, advice=advice)


def _too_big(lay: Layout, st: StaticBytes, acts: Any, *, budget: int, cfg: RunConfig) -> str:
    """When the weights alone overflow: the first change that makes one row of data.max_length fit."""
    row = acts(1).peak(True)  # with checkpointing: the least activation memory one row can take
    ckpt = "" if cfg.model.gradient_checkpointing else " and model.gradient_checkpointing: true"
    if cfg.train.optimizer == "adamw":
        smaller = lay.static - lay.optimizer + -(-st.optimizer_8bit // lay.ranks)
        if smaller + row <= budget:
            return f"set train.optimizer: adamw8bit{ckpt} (its states take {size(st.optimizer_8bit)})"
    for n in range(max(lay.ranks, 1) + 1, 65):
        fsdp = make_layouts(st, n)[-1]
        if fsdp.static + row <= budget:
            return (f"the weights, LoRA and optimizer state alone take {size(lay.static)}: shard them with "
                    f"FSDP over {n} such GPUs{ckpt} (--plan --gpus {n} shows it)")
    need = math.ceil((lay.static + row + RESERVE) / GiB)
    return (f"the weights, LoRA and optimizer state alone take {size(lay.static)}: use GPUs with >= {need} "
            f"GiB{ckpt}")


def check_model_dir(path: str) -> None:
    """--plan needs config.json only; say so in one line when it is missing."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"--plan: {p} has no config.json; model.path must be a Hugging Face model folder "
                        "(only config.json is read: weights are not needed for a plan)")


def format_plan(plan: MemoryPlan) -> str:
    """The table ``--plan`` prints: one column per layout, one row per kind of memory, per rank."""
    st, a = plan.static, plan.activations
    cols = plan.layouts
    trained = "trainable (all weights)" if plan.lora.startswith("off") else "LoRA"
    rows: list[tuple[str, list[str]]] = [
        ("4-bit base (codes + quant stats)", [size(c.quantized) for c in cols]),
        ("dense frozen (embeddings, head, norms)", [size(c.dense) for c in cols]),
        (f"{trained} parameters (fp32)", [size(c.lora) for c in cols]),
        (f"{trained} gradients", [size(c.grads) for c in cols]),
        (f"optimizer states ({_OPTIMIZER_WORDS.get(plan.optimizer, plan.optimizer)})",
         [size(c.optimizer) for c in cols]),
        ("DDP buckets / FSDP all-gather", [size(c.comm) if c.comm else "-" for c in cols]),
        (f"activations, micro-batch {a.batch} x {a.seq}, no checkpointing", [size(a.peak_plain)] * len(cols)),
        (f"activations, micro-batch {a.batch} x {a.seq}, checkpointing",
         [size(a.peak_checkpointed)] * len(cols)),
        (f"  CE chunk ({a.ce_rows} x {plan.vocab} vocab), inside both", [size(a.ce_chunk)] * len(cols)),
        ("reserve (CUDA context, workspaces, fragmentation)", [size(RESERVE)] * len(cols)),
        (f"total, checkpointing {'on' if plan.checkpointing else 'off'}",
         [size(v.total + RESERVE) for v in plan.verdicts]),
        (f"fits in {size(plan.gpu_memory)}?", ["yes" if v.fits else "NO" for v in plan.verdicts]),
        ("largest micro-batch that fits", [str(v.largest_micro_batch) for v in plan.verdicts]),
    ]
    width = max(len(r[0]) for r in rows)
    head = (f"plan: {plan.name} ({plan.model_type}, {plan.params / 1e9:.2f}B params) | micro-batch "
            f"{plan.micro_batch} x {plan.seq} tokens, {plan.dtype} | quant {plan.quant} | LoRA {plan.lora} | "
            f"GPU memory {size(plan.gpu_memory)} {plan.gpu_memory_note}".rstrip())
    lines = [head, f"{'per rank':<{width}}  " + "".join(f"{c.name:>14}" for c in cols)]
    lines += [f"{label:<{width}}  " + "".join(f"{v:>14}" for v in values) for label, values in rows]
    weights = st.quantized + st.dense + st.lora
    lines.append(f"eval.py KV cache (batch {plan.eval_batch} x {plan.kv_tokens} tokens): "
                 f"{size(plan.kv_cache)} on top of the weights ({size(weights)}) on one GPU: "
                 + ("fits" if plan.eval_fits else "does NOT fit: lower eval.batch_size"))
    for c, v in zip(cols, plan.verdicts):
        if v.advice:
            lines.append(f"{c.name}: {v.advice}")
    lines.append("activations assume every row is data.max_length tokens, all of them targets (the worst "
                 "case); FSDP is the arithmetic of FSDP2, quant state sharded with its rows")
    return "\n".join(lines)



_OPTIMIZER_WORDS = {"adamw": "AdamW exp_avg, exp_avg_sq, step", "adamw8bit": "8-bit AdamW",
                    "paged_adamw8bit": "paged 8-bit AdamW"}
