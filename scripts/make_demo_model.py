"""Make the demo base model: a small Llama pretrained from scratch on unlabelled synthetic emails.

    python scripts/make_demo_model.py [--set train.max_steps=400 ...]

1. Writes a randomly initialised Llama (HF layout: config.json, model.safetensors, the demo
   tokenizer from models/demo) into runs/demo-pretrain-init/.
2. Warm-up: a few hundred steps of copy drills, i.e. random sequences of words taken from the
   emails, each written twice (runs/demo-pretrain-drills.jsonl, made here from the seed). This is
   what gives the model "induction heads" (Olsson et al., 2022), the attention circuit that
   continues a sequence seen earlier in the context. Measured without it: after 1,200 steps on the
   emails alone (threads that quote and repeat included) the model still predicted a repeated
   email no better than a new one, and QLoRA could not teach it to copy a single entity (F1 0.00).
3. Pretrains it with *this project's own loop* in full-training mode (no 4-bit, no LoRA) on
   data/emails_unlabelled.jsonl, a corpus with no entity labels: configs/demo-pretrain.yaml.
4. Copies the result into models/demo/ (config.json + model.safetensors next to the tokenizer).

Neither phase sees an entity label or the extraction prompt, so the base still scores ~0 F1.

So the demo base knows the language of the emails but not the extraction task; the demo's QLoRA
run then has something real to teach. Deterministic on CPU for a given seed and torch version.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llama  # noqa: E402

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

# ~2.4M parameters: small enough to fine-tune with QLoRA on 2 CPU cores in minutes.
DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def write_init(out: Path, seed: int) -> None:
    """Random init as HF does for Llama: N(0, 0.02) for linears and embeddings, ones for norms."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = llama.Llama(llama.LlamaConfig.from_hf(DEMO_CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copy(ROOT / "models/demo" / name, out / name)


DRILL_ROWS, DRILL_STEPS, DRILL_LR = 26000, 1600, 2e-3
MIX_DRILL_ROWS = 20000


def write_drills(out: Path, seed: int, rows: int = DRILL_ROWS) -> None:
    """Copy drills: 16-32 pieces of the demo vocabulary drawn uniformly, as text, then the same again.

    Uniform pieces leave copying as the only way to predict the second half. Drills of whole words
    drawn from the emails were tried first: the model spent 400 steps learning how words continue and
    never started to copy.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ROOT / "models/demo/tokenizer.model"))
    first = 3 + 256  # after <unk> <s> </s> and the 256 byte pieces
    rng = random.Random(seed)
    with out.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            seq = sp.decode([rng.randrange(first, sp.get_piece_size()) for _ in range(rng.randint(16, 32))])
            f.write(json.dumps({"text": f"{seq}\n{seq}"}, ensure_ascii=False) + "\n")


def train(overrides: list[str], resume: bool) -> int:
    cmd = [sys.executable, str(ROOT / "train.py"), str(ROOT / "configs/demo-pretrain.yaml")]
    if overrides:
        cmd += ["--set", *overrides]
    if resume:
        cmd.append("--resume")
    return subprocess.call(cmd, cwd=ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], help="train.py overrides")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted pretraining run")
    args = ap.parse_args()
    init, drills = ROOT / "runs/demo-pretrain-init", ROOT / "runs/demo-pretrain-drills.jsonl"
    warm = ROOT / "runs/demo-pretrain-warmup"
    if not args.resume:
        write_init(init, args.seed)
        write_drills(drills, args.seed)
    if not (warm / "final").exists():
        rc = train([f"data.path={drills}", f"train.output_dir={warm}", f"train.max_steps={DRILL_STEPS}",
                    f"train.lr={DRILL_LR}", "data.max_length=128", "train.eval_steps=200",
                    "train.save_steps=200", "train.scheduler=constant", "data.train_size=null",
                    "data.test_size=200"],
                   resume=args.resume and (warm / "checkpoints").exists())
        if rc != 0:
            return rc
    # The email phase keeps drills in its mix (a fifth of the rows, ~6% of the tokens): without them the
    # copying learnt in the warm-up was gone after 200 steps on emails (measured).
    mix = ROOT / "runs/demo-pretrain-mix.jsonl"
    if not args.resume:
        write_drills(mix, args.seed + 1, rows=MIX_DRILL_ROWS)
        with mix.open("a", encoding="utf-8") as f:
            f.write((ROOT / "data/emails_unlabelled.jsonl").read_text(encoding="utf-8"))
    rc = train([f"model.path={warm / 'final'}", f"data.path={mix}", "data.train_size=null", *args.overrides],
               resume=args.resume and (ROOT / "runs/demo-pretrain/checkpoints").exists())
    if rc != 0:
        return rc
    final = ROOT / "runs/demo-pretrain/final"
    sd = load_file(str(final / "model.safetensors"))
    sd.pop("lm_head.weight", None)  # tied to embed_tokens: the checkpoint stores it once, as HF does
    dest = ROOT / "models/demo"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2) + "\n")
    print(f"demo base model written to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
