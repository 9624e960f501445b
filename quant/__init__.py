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

from .apply import make_hook, nf4, quantize_model
from .config import QuantConfig, QuantError
from .linear import Linear4bit, dequantize, linear_4bit, to_4bit
from .report import MemoryReport, estimate_memory, memory_report
from .saving import load_quantized, save_quantized

__all__ = ["Linear4bit", "MemoryReport", "QuantConfig", "QuantError", "dequantize", "estimate_memory",
           "linear_4bit", "load_quantized", "make_hook", "memory_report", "nf4", "quantize_model",
           "save_quantized", "to_4bit"]
