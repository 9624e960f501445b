"""Tiny real-format Llama checkpoints and SentencePiece tokenizers for the tests.

Nothing can be downloaded here, so every test that needs "a Llama" builds one: a random
`transformers.LlamaForCausalLM` written with `save_pretrained` (real safetensors, real config.json,
optionally sharded) and a SentencePiece model trained on the fly with Llama-2's settings (BPE,
byte fallback, split digits, identity normalisation, dummy prefix). Import these helpers directly
(`import hf_fixtures`) when a test needs a variant; `conftest.py` exposes the common ones as fixtures.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

# Small enough to build in well under a second, big enough to exercise GQA, RoPE and several layers.
TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

_NAMES = ["Mario Rossi", "Giulia Bianchi", "Luca Ferrari", "Francesca Esposito", "Niccolò Galli",
          "Chiara Romano", "Andrea Colombo", "Sofia Ricci", "Matteo Marino", "Elena Greco"]
_ORGS = ["Acme S.p.A.", "Ferrari Logistica S.r.l.", "Banca Intesa", "Studio Legale Bianchi",
         "Tessiture Comasche", "Officine Meccaniche Lombarde", "Caffè Vergnano", "Poste Italiane"]
_CITIES = ["Milano", "Roma", "Torino", "Napoli", "Forlì", "Cantù", "Bologna", "Città di Castello"]
_TEMPLATES = [
    "Gentile {name}, le confermo l'ordine n. {num} per {org} con consegna a {city} il {day}/{month}/2024.",
    "Buongiorno, perché la fattura {num} di {org} non è ancora stata pagata? Importo: € {amount},00.",
    "Caro {name},\nla riunione è spostata a giovedì alle {hour}:30 presso la sede di {city}.",
    "Scrivete a {mail} oppure chiamate il +39 02 {num}{hour} per qualsiasi informazione.",
    "  Spett.le {org}, in allegato il preventivo di {amount} euro. Cordiali saluti, {name}",
    "La spedizione per {city} è partita; il corriere arriverà entro {day} giorni lavorativi.",
    "Oggetto: reclamo\n\nLa merce è arrivata danneggiata a {city}: chiedo un rimborso di €{amount}.",
    "Ciao {name}! Ci vediamo lunedì? Porta i documenti di {org}, grazie mille.",
]


def italian_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic Italian business sentences with accents, emails, numbers, newlines."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        name = rng.choice(_NAMES)
        lines.append(rng.choice(_TEMPLATES).format(
            name=name, org=rng.choice(_ORGS), city=rng.choice(_CITIES),
            num=rng.randint(100, 99999), day=rng.randint(1, 28), month=rng.randint(1, 12),
            amount=rng.randint(10, 25000), hour=rng.randint(8, 18),
            mail=name.lower().replace(" ", ".").replace("ò", "o") + "@example.it"))
    return lines


def train_sentencepiece(out_dir: str | Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """Train a Llama-2-style SentencePiece BPE model; returns the path of `tokenizer.model`.

    Settings follow Llama-2's own `tokenizer.model` (its trainer_spec): BPE, byte_fallback,
    split_digits, identity normalisation, no whitespace collapsing, unk=0 bos=1 eos=2, no pad.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    # SentencePiece reads one sentence per line; multi-line texts are split for training only.
    corpus.write_text("\n".join(part for line in italian_corpus(seed=seed)
                                for part in line.split("\n")) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
    )
    corpus.unlink()
    (out_dir / "tokenizer.vocab").unlink()
    return out_dir / "tokenizer.model"


def write_tokenizer_files(model_dir: str | Path, vocab_size: int = 512, seed: int = 0) -> None:
    """Put a trained `tokenizer.model` plus Llama-2-like tokenizer_config/special_tokens_map in a dir."""
    model_dir = Path(model_dir)
    train_sentencepiece(model_dir, vocab_size=vocab_size, seed=seed)
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "legacy": False, "model_max_length": 1000000,
        "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": False,
    }, indent=2))
    (model_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))


def make_hf_checkpoint(
    out_dir: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    tokenizer: bool = False,
    legacy_config: bool = False,
    **overrides: Any,
) -> Path:
    """Write a random `LlamaForCausalLM` with `save_pretrained` (safetensors) into `out_dir`.

    `overrides` change `TINY_CONFIG` (e.g. num_key_value_heads=4, attention_bias=True,
    rope_scaling={...}). `max_shard_size="20KB"` gives a sharded checkpoint with an index.json.
    `legacy_config=True` rewrites config.json the way transformers 4.x (and every published
    Llama-2/3 checkpoint) has it: top-level rope_theta/rope_scaling and torch_dtype.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    cfg = dict(TINY_CONFIG)
    cfg.update(overrides)
    torch.manual_seed(seed)
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config).eval()
    # HF's init gives tiny std (0.02); widen the norms a bit so bugs there show in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    _save(model, out_dir, dtype, max_shard_size)
    if legacy_config:
        to_legacy_config(out_dir / "config.json", dtype)
    if tokenizer:
        write_tokenizer_files(out_dir, vocab_size=cfg["vocab_size"], seed=seed)
    return out_dir


def to_legacy_config(config_path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Rewrite a transformers-5 config.json into the transformers-4.x shape published models have."""
    cfg = json.loads(config_path.read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    cfg["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("head_dim", None)  # Llama-2's config.json has no head_dim
    cfg["transformers_version"] = "4.31.0"
    config_path.write_text(json.dumps(cfg, indent=2))


# ---------------------------------------------------------------------- other families
# Tiny configs with odd shapes: head counts that are not powers of two, GQA / MQA, Gemma's head_dim
# independent of hidden/heads, Phi's partial rotary, windows shorter than the test sequences.
_FAMILY_BASE: dict[str, Any] = dict(vocab_size=512, max_position_embeddings=256, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=None, num_hidden_layers=2)
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "mistral": dict(hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2,
                    sliding_window=8),
    "mixtral": dict(hidden_size=48, intermediate_size=40, num_attention_heads=6, num_key_value_heads=3,
                    num_local_experts=5, num_experts_per_tok=2, sliding_window=None),
    "gemma": dict(hidden_size=48, intermediate_size=96, num_attention_heads=3, num_key_value_heads=1,
                  head_dim=32, bos_token_id=2, eos_token_id=1, pad_token_id=0),
    "phi": dict(hidden_size=60, intermediate_size=120, num_attention_heads=5, num_key_value_heads=5,
                partial_rotary_factor=0.5),
    "qwen2": dict(hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2),
}
FAMILY_CLASSES = {"mistral": "Mistral", "mixtral": "Mixtral", "gemma": "Gemma", "phi": "Phi",
                  "qwen2": "Qwen2"}


def hf_classes(family: str) -> tuple[Any, Any]:
    """(config class, ForCausalLM class) of transformers for a family name."""
    import transformers

    stem = "Llama" if family == "llama" else FAMILY_CLASSES[family]
    return getattr(transformers, f"{stem}Config"), getattr(transformers, f"{stem}ForCausalLM")


def make_family_checkpoint(
    out_dir: str | Path,
    family: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    legacy_config: bool = False,
    **overrides: Any,
) -> Path:
    """A random transformers `<Family>ForCausalLM` written by `save_pretrained` (see FAMILY_CONFIGS).

    Norm weights, biases and the MoE router are widened from HF's tiny init so that a mistake in any
    of them shows in the logits. `legacy_config=True` writes the transformers 4.x config.json shape.
    """
    config_cls, model_cls = hf_classes(family)
    out_dir = Path(out_dir)
    cfg = {**_FAMILY_BASE, **FAMILY_CONFIGS[family], **overrides}
    partial = cfg.pop("partial_rotary_factor", None)
    torch.manual_seed(seed)
    config = config_cls(**cfg)
    if partial is not None:
        config.rope_parameters["partial_rotary_factor"] = partial
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                # Gemma stores (weight - 1): around 0, the others around 1.
                p.copy_(torch.rand(p.shape, generator=gen) - 0.5 + (family != "gemma"))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif ".gate." in name:  # the MoE router (not gate_proj)
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)  # routing that is far from uniform
    _save(model, out_dir, dtype, max_shard_size)
    if legacy_config:
        to_legacy_family_config(out_dir / "config.json", family, dtype)
    return out_dir


def to_legacy_family_config(config_path: Path, family: str, dtype: torch.dtype = torch.float32) -> None:
    """The transformers 4.x config.json of a family: rope keys at the top level (Phi's
    partial_rotary_factor too), torch_dtype, and Gemma's `hidden_act: gelu` + `hidden_activation`."""
    new = json.loads(config_path.read_text())
    to_legacy_config(config_path, dtype)
    cfg = json.loads(config_path.read_text())
    rope = new.get("rope_parameters") or {}
    if "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if family == "gemma":  # what google/gemma-7b's config.json says (head_dim 256 is written there)
        cfg["hidden_act"], cfg["hidden_activation"] = "gelu", None
        cfg["head_dim"] = new["head_dim"]
    if family == "qwen2":
        cfg.pop("layer_types", None)  # 4.x derives them from use_sliding_window / max_window_layers
    config_path.write_text(json.dumps(cfg, indent=2))


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and their attention mask (1 = real token), as batched generation feeds them."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_generate(ref: torch.nn.Module, prompts: list[list[int]], n: int, eos: int | list[int],
                pad: int = 0) -> list[list[int]]:
    """transformers' greedy `generate` on left-padded prompts: the new ids of each row, cut before
    its first EOS (any of `eos`)."""
    ids, mask = left_pad(prompts, pad)
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad,
                           eos_token_id=eos)[:, ids.shape[1]:].tolist()
    stops = eos if isinstance(eos, list) else [eos]
    return [row[:min((row.index(e) for e in stops if e in row), default=len(row))] for row in out]


def _save(model: Any, out_dir: Path, dtype: Any, max_shard_size: str | None) -> None:
    """save_pretrained as safetensors in ``dtype`` (sharded when ``max_shard_size`` is given)."""
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.to(dtype).save_pretrained(out_dir, **kwargs)
