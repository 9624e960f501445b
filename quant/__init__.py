"""quant: 4-bit (NF4/FP4) base weights for QLoRA, stored by bitsandbytes, computed by our own path.

    qc = quant.QuantConfig(compute_dtype=torch.bfloat16)            # NF4, double quant, blocksize 64
    model = llama.from_pretrained(path, device="cuda", dtype=torch.bfloat16,
                                  linear_hook=quant.make_hook(qc))   # or quant.nf4(compute_dtype=...)
    print(quant.memory_report(model))
    print(quant.estimate_memory(meta_skeleton, qc))                  # the same, from shapes only
    quant.save_quantized(model, "llama-7b-nf4", qc)
    with torch.device("meta"):
        skeleton = llama.Llama(cfg)
    model = quant.load_quantized(skeleton, "llama-7b-nf4", qc, device="cuda")

Imports none of our other packages (torch, bitsandbytes and safetensors only).
"""

from importlib import import_module
from typing import Any

from .config import BLOCKSIZES, QUANT_TYPES, QuantConfig, QuantError

# The rest needs bitsandbytes, whose import takes seconds and prints kernel notices: it loads on first
# use (PEP 562), so a program that only checks settings against QuantConfig's rules stays fast and quiet.
_WHERE = {"make_hook": "apply", "nf4": "apply", "quantize_model": "apply",
          "Linear4bit": "linear", "dequantize": "linear", "linear_4bit": "linear", "to_4bit": "linear",
          "MemoryReport": "report", "estimate_memory": "report", "memory_report": "report",
          "load_quantized": "saving", "save_quantized": "saving"}

__all__ = ["BLOCKSIZES", "QUANT_TYPES", "QuantConfig", "QuantError", *_WHERE]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'quant' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # found once; later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
