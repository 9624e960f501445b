"""llama: a hand-written Llama decoder that loads HF safetensors checkpoints (logits equal transformers').

    model = llama.from_pretrained(path, device="cpu", dtype=torch.float32, linear_hook=None)
    tok = llama.Tokenizer.from_pretrained(path)
    texts = llama.generate(model, tok, ["prompt"], max_new_tokens=64)
"""

from .config import LlamaConfig, LoadError
from .generate import decode_step, filter_logits, generate, generate_ids, sample
from .load import from_pretrained
from .model import KVCache, Llama
from .tokenizer import Tokenizer, TokenizerError

__all__ = ["KVCache", "Llama", "LlamaConfig", "LoadError", "Tokenizer", "TokenizerError", "decode_step",
           "filter_logits", "from_pretrained", "generate", "generate_ids", "sample"]
