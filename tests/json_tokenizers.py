"""tokenizer.json fixtures in the two shapes Llama-family models publish, built here (nothing to download).

- `write_byte_level(dir)`: a GPT-2 style byte-level BPE trained on the Italian corpus, with Llama-3's
  conventions: `<|begin_of_text|>` added in front by the post-processor, `<|eot_id|>` ending a turn,
  `<|end_of_text|>` as EOS in generation_config.json, and Llama-3's chat template layout.
- `write_sentencepiece_style(dir, tokenizer_dir)`: Llama-2's tokenizer.json, as transformers converts
  it from the fixture's tokenizer.model (Metaspace, byte fallback, `<s>` added in front).
"""

from __future__ import annotations

import json
from pathlib import Path

import hf_fixtures

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]
# Llama-3-Instruct's template layout (header tokens, "\n\n", trimmed content, <|eot_id|>), shortened.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _train_byte_level(specials: list[str], vocab_size: int, seed: int):
    """A GPT-2 style byte-level BPE trained on the Italian corpus, `specials` first in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(hf_fixtures.italian_corpus(2000, seed=seed), trainer)
    return tok


def write_byte_level(out: Path, vocab_size: int = 600) -> Path:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = _train_byte_level(LLAMA3_SPECIALS, vocab_size, seed=3)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf.chat_template = LLAMA3_CHAT_TEMPLATE
    hf.save_pretrained(out)
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = LLAMA3_CHAT_TEMPLATE
    cfg_file.write_text(json.dumps(cfg, indent=2))
    eos = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))
    return out


def write_sentencepiece_style(out: Path, tokenizer_dir: Path) -> Path:
    """Llama-2's tokenizer.json (no tokenizer.model beside it), converted by transformers."""
    from transformers import LlamaTokenizer

    hf = LlamaTokenizer.from_pretrained(tokenizer_dir)
    hf.save_pretrained(out)
    (out / "tokenizer.model").unlink(missing_ok=True)
    return out


def write_qwen2_like(out: Path, vocab_size: int = 600) -> Path:
    """Qwen2 / Phi conventions: byte-level BPE, no BOS at all, `<|endoftext|>` pads, `<|im_end|>` ends."""
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = _train_byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size, seed=4)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.save_pretrained(out)
    return out
