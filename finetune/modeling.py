"""Compose the model a run trains or evaluates: llama loader -> (4-bit quant hook) -> LoRA (or full training).

Here llama, quant and lora are composed into one model (``finetune.evaluate.dense`` later folds quant and lora
back into dense layers for fast generation); the training loop (``finetune.run.loop``) and the evaluator
(``finetune.evaluate.evaluator``) both call ``load_model``. The tokenizer is theirs to load (first:
it is cheap and its errors come before a 7B load), once per run.
Dtypes: on CUDA the frozen base computes in ``model.dtype`` (bf16 by default); on CPU everything is
fp32 (bf16 matmuls on CPU are slow and fp32 keeps the tests exact). Full training (LoRA off) keeps
fp32 master weights even on CUDA, so AdamW's small updates are not rounded away; autocast supplies the
bf16 compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import llama
import lora
import quant
from finetune.config import RunConfig
from finetune.errors import UserError

Log = Callable[[str], None]


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; an explicit cuda without a GPU is a user error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device is {spec!r} but no CUDA device is visible; set model.device: auto "
                        "or cpu")
    return torch.device(spec)


def compute_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else getattr(torch, cfg.model.dtype)


def quant_config(cfg: RunConfig, dtype: torch.dtype) -> Any:
    """The run config's quant section as a ``quant.QuantConfig`` (imports bitsandbytes)."""
    quant_cfg = cfg.quant
    return quant.QuantConfig(quant_type=quant_cfg.quant_type, double_quant=quant_cfg.double_quant,
                             blocksize=quant_cfg.blocksize, compute_dtype=dtype, skip=tuple(quant_cfg.skip))


def load_model(cfg: RunConfig, for_training: bool = True, log: Log | None = print) -> nn.Module:
    """The model as the config says; for training with LoRA injected (or all weights trainable).

    ``for_training=False`` loads the base only (no LoRA, everything frozen, eval mode): the evaluator
    then attaches a saved adapter with ``lora.load_adapter``. ``log`` receives the memory report and the
    trainable-parameter count (None = silent; distributed ranks other than 0 pass None).
    """
    log = log or (lambda _msg: None)
    device = resolve_device(cfg.model.device)
    dtype = compute_dtype(cfg, device)
    full_training = for_training and not cfg.lora.enabled
    weight_dtype = torch.float32 if full_training else dtype
    quantized = cfg.quant.enabled or cfg.model.prequantized is not None
    if quantized and full_training:
        raise UserError("4-bit base weights cannot be trained: with lora.enabled false set quant.enabled "
                        "false (and model.prequantized null)")
    if cfg.model.prequantized is not None:
        with torch.device("meta"):
            skeleton = llama.Llama(llama.LlamaConfig.from_hf(cfg.model.path))
        model = quant.load_quantized(skeleton, cfg.model.prequantized, quant_config(cfg, dtype),
                                     device=device)
        model = model if isinstance(model, nn.Module) else skeleton
        model.model.rotary_emb.reset(device)  # the fp32 RoPE table, whatever the file stored
    else:
        hook = None
        if cfg.quant.enabled:
            hook = quant.make_hook(quant_config(cfg, dtype))
        model = llama.from_pretrained(cfg.model.path, device=device, dtype=weight_dtype, linear_hook=hook)

    if for_training:
        if cfg.lora.enabled:
            lora_cfg = cfg.lora
            stats = lora.inject(model, targets=lora_cfg.targets, r=lora_cfg.r, alpha=lora_cfg.alpha,
                                dropout=lora_cfg.dropout, use_rslora=lora_cfg.use_rslora)
            log(f"lora: {stats}")
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        model.gradient_checkpointing = cfg.model.gradient_checkpointing
        model.train()
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    if quantized:
        log(f"memory: {quant.memory_report(model)}")
    else:
        log(f"memory: {_plain_memory_report(model)}")
    trainable, total = lora.count_parameters(model)
    log(f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.4f}%) "
        f"on {device}, compute {str(dtype).removeprefix('torch.')}")
    return model


def _plain_memory_report(model: nn.Module) -> str:
    """Bytes of the weights by dtype (the quant package's report covers the 4-bit case)."""
    by_dtype: dict[str, int] = {}
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        key = str(p.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + p.numel() * p.element_size()
    parts = ", ".join(f"{n / 2**20:.1f} MiB {k}" for k, n in sorted(by_dtype.items()))
    return f"weights {parts} (no quantisation)"
