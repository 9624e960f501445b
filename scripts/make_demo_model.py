"""Make the demo base model: a small Llama pretrained from scratch on unlabelled synthetic emails.

    python scripts/make_demo_model.py [--set train.max_steps=400 ...]

1. Writes a randomly initialised Llama (HF layout: config.json, model.safetensors, the demo
   tokenizer from models/demo) into runs/demo-pretrain-init/.
2. Pretrains it with *this project's own loop* in full-training mode (no 4-bit, no LoRA) on
   data/emails_unlabelled.jsonl, a corpus with no entity labels: configs/demo-pretrain.yaml.
3. Copies the result into models/demo/ (config.json + model.safetensors next to the tokenizer).

So the demo base knows the language of the emails but not the extraction task; the demo's QLoRA
run then has something real to teach. Deterministic on CPU for a given seed and torch version.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], help="train.py overrides")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted pretraining run")
    args = ap.parse_args()
    init = ROOT / "runs/demo-pretrain-init"
    if not args.resume:
        write_init(init, args.seed)
    cmd = [sys.executable, str(ROOT / "train.py"), str(ROOT / "configs/demo-pretrain.yaml")]
    if args.overrides:
        cmd += ["--set", *args.overrides]
    if args.resume:
        cmd.append("--resume")
    rc = subprocess.call(cmd, cwd=ROOT)
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
