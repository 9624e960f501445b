"""GGUF export read back by transformers (the oracle): logits of the merged model, and the tokenizer.

Each family's tiny model gets a trained-looking adapter on its 4-bit base; ``export.py``'s own code
path writes the GGUF; ``transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` loads it
(undoing llama.cpp's q/k permutation and dequantising) and its logits are compared with our merged model
(the 4-bit base dequantised, the adapter folded in: what the export must contain). Limits, relative to the
largest reference logit: f32 1e-4 absolute, f16/bf16 1e-2, q8_0 5e-2, q4_0 0.25 (recorded, not a target).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_testlib import FAMILIES, SMOLLM2, make_model, save_adapter, write_config

from finetune.export import gguf_file

PROMPTS = ["Gentile Mario Rossi, la consegna per Acme S.p.A. a Milano è confermata.",
           "Scrivete a mario.rossi@example.it oppure chiamate il +39 02 12345."]
LIMITS = {"f32": ("abs", 1e-4), "f16": ("rel", 1e-2), "bf16": ("rel", 1e-2), "q8_0": ("rel", 5e-2),
          "q4_0": ("rel", 0.25)}
# tokenizer corpus: accents, emoji, code, leading and repeated spaces, newlines, digits, CJK (no control-token
# strings: ours keep "<|im_start|>" in data as text by design, transformers parses it)
CORPUS = ["Città di Castello, perché no? Forlì è più vicina.", "Ciao 😀👍🏽 a tutti!",
          "def f(x):\n    return {'a': x ** 2}  # ok", " leading space", "   three spaces",
          "numeri 1234567 e 3.14159", "tab\tand\nnewline\n\n", "naïve café über straße", "日本語のテキスト",
          "mixed   spaces\t\t and\r\nCRLF"]


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """family -> (config path, our merged model, tokenizer); built once for the module."""
    from finetune.config import load_config
    from finetune.evaluate.dense import densify
    from finetune.evaluate.evaluator import load_for_eval

    root = tmp_path_factory.mktemp("gguf_families")
    out = {}
    for family in FAMILIES:
        model_dir = make_model(root, family)
        adapter = save_adapter(model_dir, root / f"{family}-adapter")
        cfg_path = write_config(root / f"{family}.yaml", model_dir, root / f"{family}-run")
        cfg = load_config(cfg_path)
        import llama

        model = densify(load_for_eval(cfg, str(model_dir), adapter)).eval()
        out[family] = (cfg, adapter, model, llama.Tokenizer.from_pretrained(model_dir))
    return out


def _export(cfg, adapter, out: Path, kind: str) -> Path:
    from finetune.export.runner import run_export

    return run_export(cfg, "gguf", str(out), adapter=str(adapter), gguf_type=kind, progress=False,
                      log=lambda s: None)


@pytest.mark.parametrize("kind", gguf_file.GGUF_TYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_our_gguf_with_our_logits(setups, tmp_path, family, kind):
    from transformers import AutoModelForCausalLM

    cfg, adapter, ours, tok = setups[family]
    path = _export(cfg, adapter, tmp_path / f"{family}-{kind}.gguf", kind)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    worst_abs, worst_rel = 0.0, 0.0
    for text in PROMPTS:
        ids = torch.tensor([tok.encode(text, bos=True)])
        with torch.no_grad():
            ref, got = ours(ids).float(), hf(ids).logits.float()
        diff = (ref - got).abs().max().item()
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / ref.abs().max().item())
    print(f"\nGGUF {family} {kind}: max abs {worst_abs:.3g}, relative {worst_rel:.3g}")
    measure, limit = LIMITS[kind]
    assert (worst_abs if measure == "abs" else worst_rel) <= limit


def test_metadata_is_what_llama_cpp_reads(setups, tmp_path):
    """Keys and tensor names as llama.cpp's converter writes them (read back with gguf-py's reader)."""
    import gguf

    cfg, adapter, ours, tok = setups["llama3-bpe"]
    path = _export(cfg, adapter, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(path)

    def value(key):
        f = reader.fields[key]
        return f.contents()

    c = ours.config
    assert value("general.architecture") == "llama"
    assert value("llama.context_length") == c.max_position_embeddings
    assert value("llama.attention.head_count") == c.num_attention_heads
    assert value("llama.attention.head_count_kv") == c.num_key_value_heads
    assert value("llama.rope.freq_base") == pytest.approx(c.rope_theta)
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.bos_token_id") == tok.bos_id
    assert value("tokenizer.ggml.eos_token_id") == tok.eos_id
    assert value("tokenizer.ggml.add_bos_token") is True
    assert value("tokenizer.chat_template") == tok.chat_template
    names = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_q.weight",
            "blk.1.ffn_down.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"} <= set(names)
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./m.gguf\n")


def test_q_and_k_rows_are_permuted_as_llama_cpp_expects():
    """The converter's reorder: head h's rows [first half, second half] interleaved pairwise."""
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of 4 rows
    p = gguf_file.permute_rows(w, 2)
    assert p[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]


def test_mistral_window_and_qwen2_biases_are_written(setups, tmp_path):
    import gguf

    cfg, adapter, _, _ = setups["mistral"]
    reader = gguf.GGUFReader(_export(cfg, adapter, tmp_path / "mistral" / "m.gguf", "f32"))
    assert reader.fields["llama.attention.sliding_window"].contents() == 64
    cfg, adapter, _, _ = setups["qwen2"]
    reader = gguf.GGUFReader(_export(cfg, adapter, tmp_path / "qwen2" / "m.gguf", "f32"))
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert "blk.0.attn_q.bias" in {t.name for t in reader.tensors}


# ---------------------------------------------------------------------------------------------------
# tokenizers: what transformers builds from our GGUF against our ids
def _tokenizer_gguf(model_dir: Path, out: Path) -> Path:
    """A GGUF holding the architecture keys and the tokenizer only (all a tokenizer reader needs)."""
    import gguf

    import llama

    cfg, tok = llama.LlamaConfig.from_hf(model_dir), llama.Tokenizer.from_pretrained(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tok.gguf"
    writer = gguf.GGUFWriter(path, gguf_file.arch_of(cfg.model_type))
    gguf_file.add_architecture(writer, cfg, "tok")
    gguf_file.add_tokenizer(writer, tok, model_dir, vocab_size=cfg.vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def _hf_from_gguf(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_bpe_tokenizer_from_gguf_gives_our_ids(setups, tmp_path):
    import llama

    _, _, _, tok = setups["llama3-bpe"]
    model_dir = Path(tok.source).parent
    hf = _hf_from_gguf(_tokenizer_gguf(model_dir, tmp_path))
    ours = llama.Tokenizer.from_pretrained(model_dir)
    for text in CORPUS:
        assert hf(text)["input_ids"] == ours.encode(text, bos=True), text
        assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text


def test_sentencepiece_tokenizer_from_gguf(setups, tmp_path):
    """Our ids on every text that does not start with a space; on those transformers 5's SentencePiece
    tokenizers differ from Meta's/ours in the dummy prefix (llama/tokenizer.py), and the GGUF-built one
    then equals transformers' own tokenizer of the original tokenizer.model."""
    from transformers import AutoTokenizer

    _, _, _, tok = setups["llama-spm"]
    model_dir = Path(tok.source).parent
    hf = _hf_from_gguf(_tokenizer_gguf(model_dir, tmp_path))
    original = AutoTokenizer.from_pretrained(model_dir)
    for text in CORPUS:
        if not text[0].isspace():
            assert hf(text)["input_ids"] == tok.encode(text, bos=True), text
        assert hf(text)["input_ids"] == original(text)["input_ids"], text


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(),
                    reason="models/SmolLM2-135M-Instruct is absent")
def test_smollm2_tokenizer_from_gguf_gives_our_ids(tmp_path):
    import llama

    path = _tokenizer_gguf(SMOLLM2, tmp_path)
    hf = _hf_from_gguf(path)
    ours = llama.Tokenizer.from_pretrained(SMOLLM2)
    for text in CORPUS:
        assert hf(text)["input_ids"] == ours.encode(text, bos=True), text
    import gguf

    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "gpt-2"

