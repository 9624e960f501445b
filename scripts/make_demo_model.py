"""Make the demo base model: a small Llama pretrained from scratch on unlabelled synthetic emails.

    python scripts/make_demo_model.py            # ~32 min on 2 CPU cores; --resume after a crash

Everything is trained by *this project's own loop* (train.py, full training: no 4-bit, no LoRA) from
a random init, in three phases; no phase sees an entity label or the extraction prompt:

1. copy drills (runs/demo-pretrain-1-drills): strings of uniformly drawn vocabulary pieces written
   twice. Copying is the only way to predict their second half, and after ~1,000 steps the model
   learns it abruptly: the "induction heads" of Olsson et al. (2022), the circuit that continues a
   sequence seen earlier in the context. Extraction is copying, so the demo needs this circuit.
2. transfer (runs/demo-pretrain-2-transfer): drills, *echoes* (24-60 consecutive email tokens written
   twice) and 120-token email windows, with a 100-step lr warm-up, so that the circuit is kept and
   used on email text.
3. emails (runs/demo-pretrain): configs/demo-pretrain.yaml, whole unlabelled emails and threads
   (data/emails_unlabelled.jsonl) with drills and echoes still in the mix, packed into ~460-token rows,
   for 1,200 steps (~1 epoch, most of the build's time). Measured by the fine-tuned demo's micro-F1
   on 200 test emails: 22.6% after 400 steps, 25.6% after 800, 28.1% after 1,200, but 16.8% after
   1,600 (the outcome swings from base to base; docs/DESIGN-NOTES.md, "The demo", item 11).

Then it copies the result into models/demo/ (config.json + model.safetensors next to the tokenizer).
Why three phases (all measured; docs/DESIGN-NOTES.md, "The demo"): emails alone, even threads that
repeat themselves, never taught this model to copy within a CPU budget; drills mixed with emails
from the start did not either (1,400 steps); and a drill-only model put straight onto whole emails
lost the circuit within 100 steps.

Deterministic on CPU for a given seed and torch version: the corpora are written from fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from make_demo_data import write_jsonl  # noqa: E402  (scripts/ is on sys.path when run as a script)

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

RUNS = ROOT / "runs"
INIT, CORPORA = RUNS / "demo-pretrain-init", RUNS / "demo-pretrain-corpora"
# (output dir, corpus, seed, train.py overrides); phase 3 is configs/demo-pretrain.yaml as written.
PHASES = [
    (RUNS / "demo-pretrain-1-drills", CORPORA / "drills.jsonl", 5,
     ["train.max_steps=1400", "train.lr=2e-3", "data.max_length=128", "train.warmup_steps=20",
      "train.eval_steps=400", "train.save_steps=200"]),
    (RUNS / "demo-pretrain-2-transfer", CORPORA / "transfer.jsonl", 31,
     ["train.max_steps=800", "train.lr=1e-3", "data.max_length=160", "train.warmup_steps=100",
      "train.eval_steps=400", "train.save_steps=100"]),
    (RUNS / "demo-pretrain", CORPORA / "emails.jsonl", 13, []),
]
PACK_TOKENS = 460


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


# ----------------------------------------------------------------------------------------------------
# the three corpora (unlabelled: drills, echoes and emails carry no entity annotation)


def text_pieces(sp: spm.SentencePieceProcessor) -> list[int]:
    """The ids of the pieces that spell text: every id but <unk>, <s>, </s> and the 256 byte pieces."""
    return [i for i in range(sp.get_piece_size())
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]


def drill(rng: random.Random, sp: spm.SentencePieceProcessor, pieces: list[int]) -> str:
    """16-32 pieces drawn uniformly from `pieces` (text_pieces), as text, twice."""
    seq = sp.decode([rng.choice(pieces) for _ in range(rng.randint(16, 32))])
    return f"{seq}\n{seq}"


def window(rng: random.Random, sp: spm.SentencePieceProcessor, text: str, n: int) -> str:
    """n consecutive tokens of `text` from a random start, as text."""
    ids = sp.encode(text)
    start = rng.randrange(max(1, len(ids) - n))
    return sp.decode(ids[start:start + n])


def echo(rng: random.Random, sp: spm.SentencePieceProcessor, text: str, longest: int) -> str:
    """A window of 24..longest tokens of an email, twice: copying on the emails' own words."""
    seq = window(rng, sp, text, rng.randint(24, longest))
    return f"{seq}\n{seq}"


def pack(texts: list[str], sp: spm.SentencePieceProcessor, limit: int) -> list[str]:
    """Join consecutive texts (blank line between) into rows of about `limit` tokens.

    One email is ~265 tokens; single-email rows padded to the batch's longest spent two thirds of
    each CPU step on padding (measured: 2.7k useful tokens/s, packed rows ~4.5k). A text longer than
    data.max_length on its own (a few long threads) is skipped by the loop, with a warning."""
    rows, row, size = [], [], 0
    for text in texts:
        n = len(sp.encode(text)) + 2
        if row and size + n > limit:
            rows.append("\n\n".join(row))
            row, size = [], 0
        row.append(text)
        size += n
    rows.append("\n\n".join(row))
    return rows


def corpus(phase: int, seed: int, sp: spm.SentencePieceProcessor, emails: list[str]) -> list[str]:
    """The texts of phase `phase` (0-based), drawn from `seed`, made from the unlabelled `emails`."""
    rng, pieces = random.Random(seed), text_pieces(sp)
    if phase == 0:
        return [drill(rng, sp, pieces) for _ in range(26000)]
    if phase == 1:
        texts = [drill(rng, sp, pieces) for _ in range(16000)]
        texts += [echo(rng, sp, rng.choice(emails), 60) for _ in range(16000)]
        texts += [window(rng, sp, rng.choice(emails), 120) for _ in range(12000)]
        rng.shuffle(texts)
        return texts
    texts = emails + [drill(rng, sp, pieces) for _ in range(16000)]
    texts += [echo(rng, sp, rng.choice(emails), 48) for _ in range(16000)]
    rng.shuffle(texts)
    return pack(texts, sp, PACK_TOKENS)


# ----------------------------------------------------------------------------------------------------


def train(overrides: list[str], resume: bool) -> int:
    cmd = [sys.executable, str(ROOT / "train.py"), str(ROOT / "configs/demo-pretrain.yaml"),
           "--set", *overrides]
    if resume:
        cmd.append("--resume")
    return subprocess.call(cmd, cwd=ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the random init")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run where it stopped")
    args = ap.parse_args()
    if not args.resume:
        taken = [p for p, _, _, _ in PHASES if p.exists()]
        if taken:
            print(f"error: {taken[0]} exists from an earlier run; pass --resume to continue it, or "
                  f"remove runs/demo-pretrain* to start over", file=sys.stderr)
            return 2
        write_init(INIT, args.seed)
        sp = spm.SentencePieceProcessor(model_file=str(ROOT / "models/demo/tokenizer.model"))
        emails = [json.loads(line)["text"] for line in
                  (ROOT / "data/emails_unlabelled.jsonl").read_text(encoding="utf-8").splitlines()]
        for i, (_, path, seed, _) in enumerate(PHASES):
            write_jsonl(corpus(i, seed, sp, emails), path)
    start = INIT
    for out, path, _, overrides in PHASES:
        if not (out / "final").exists():
            sets = [f"model.path={start}", f"data.path={path}", f"train.output_dir={out}", *overrides]
            rc = train(sets, resume=args.resume and (out / "checkpoints").exists())
            if rc != 0:
                return rc
        start = out / "final"
    sd = load_file(str(start / "model.safetensors"))
    sd.pop("lm_head.weight", None)  # tied to embed_tokens: the checkpoint stores it once, as HF does
    dest = ROOT / "models/demo"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2) + "\n")
    print(f"demo base model written to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
