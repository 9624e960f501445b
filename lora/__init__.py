"""lora: LoRA for any PyTorch model — PEFT-exact maths, PEFT-format adapters, 4-bit bases.

Depends on torch and safetensors only (bitsandbytes is imported lazily, to dequantise a 4-bit base
for `merge_and_export`), and on nothing else of this project, so it can be vendored alone.

    stats = lora.inject(model, targets=["q_proj", "v_proj"], r=16, alpha=32, dropout=0.05)
    optimizer = torch.optim.AdamW(lora.trainable_parameters(model), lr=1e-4)
    lora.save_adapter(model, "adapter/")          # PeftModel.from_pretrained reads it
    lora.load_adapter(other_model, "adapter/")    # strict: wrong keys/shapes/config raise LoRAError
"""

from .adapter import (
    adapter_config,
    adapter_state_dict,
    load_adapter,
    read_adapter,
    read_adapter_config,
    save_adapter,
)
from .export import dense_weight, merge_and_export
from .inject import (
    DEFAULT_TARGETS,
    InjectStats,
    count_parameters,
    disable_adapter,
    inject,
    linear_names,
    lora_modules,
    match_targets,
    merge,
    trainable_parameters,
    unmerge,
)
from .layer import LoRAError, LoRALinear

__all__ = [
    "DEFAULT_TARGETS", "InjectStats", "LoRAError", "LoRALinear", "adapter_config", "adapter_state_dict",
    "count_parameters", "dense_weight", "disable_adapter", "inject", "linear_names", "load_adapter",
    "lora_modules", "match_targets", "merge", "merge_and_export", "read_adapter", "read_adapter_config",
    "save_adapter", "trainable_parameters", "unmerge",
]
