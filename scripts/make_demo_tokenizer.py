"""Train the demo's SentencePiece tokenizer on the unlabelled synthetic emails (never the labelled ones).

    python scripts/make_demo_tokenizer.py            # data/emails_unlabelled.jsonl -> models/demo/
    python scripts/make_demo_tokenizer.py --report   # also: token lengths of data/emails.csv rows (alpaca)

Settings are Llama-2's (as in tests/hf_fixtures.py): BPE, byte fallback (no text is ever <unk>),
digits split one by one, identity normalisation, dummy prefix, whitespace kept as is, unk=0 bos=1
eos=2 and no pad piece. SentencePiece reads one sentence per line, so each email is fed line by line
(newlines are then byte-fallback pieces, <0x0A>, exactly as in Llama-2's vocabulary).

One departure from Llama-2: the capital letters, "€" and "+" are user-defined symbols, i.e. always a
piece of their own. With Llama-2's pieces a word is spelt one way after a space ("▁Adele") and
another at the start of a line ("A" "d" "ele"), and every answer line of the entity format starts
with a span copied out of the email: half the demo's gold spans would have to be re-spelt, which a
2.4M-parameter model cannot learn (it recalled 4.8% of them, against 43% of the others). With the
symbols, "Adele" is "A" "dele" in both places ("▁" "A" "dele" after a space), as digits already are;
92% of gold spans become verbatim runs of the email's pieces (49% before), for 13% more tokens.
HF's LlamaTokenizer agrees token for token on every prompt; on a raw text that *starts* with one of
the symbols it omits the dummy-prefix "▁" that SentencePiece (and so our tokenizer) puts first.

Determinism: sentences go in through an iterator and the model comes out through a writer, so the
model proto records no file paths; one thread, all sentences (no sampling). Same corpus -> same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 4096
# Always a piece of their own (see the module docstring): entity spans then start with the same
# pieces at the start of an answer line as inside the email.
USER_SYMBOLS = [*"ABCDEFGHIJKLMNOPQRSTUVWXYZ", *"ÀÈÉÌÒÙ", "€", "+"]

TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
    "unk_token": "<unk>", "pad_token": None, "legacy": False, "model_max_length": 1000000,
    "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": False,
}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def corpus_sentences(jsonl: Path) -> list[str]:
    """The non-empty lines of every `text` in a JSONL file, in file order."""
    out = []
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.extend(part for part in json.loads(line)["text"].split("\n") if part.strip())
    return out


def train_tokenizer(sentences: list[str], out_dir: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train on `sentences`, write tokenizer.model + tokenizer_config.json + special_tokens_map.json."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, user_defined_symbols=USER_SYMBOLS,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
    return out_dir / "tokenizer.model"


def length_report(tokenizer_dir: Path, csv_path: Path, template: str = "alpaca") -> dict[str, float]:
    """Token lengths of `[BOS] prompt response [EOS]` for every row, as the training pipeline builds them."""
    sys.path.insert(0, str(ROOT))
    from finetune.config import DataConfig
    from finetune.data.examples import encode_example
    from finetune.data.rows import load_rows
    from finetune.data.templates import format_prompt
    from llama.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    cfg = DataConfig(path=str(csv_path), template=template, max_length=1_000_000)
    lengths = sorted(len(encode_example(tok, cfg, row).input_ids) for row in load_rows(cfg))
    n = len(lengths)
    return {"rows": n, "template_tokens": len(tok.encode(format_prompt(cfg, ""))) + 1,
            "p50": lengths[n // 2], "p95": lengths[int(n * 0.95)], "max": lengths[-1],
            "share_le_256": sum(x <= 256 for x in lengths) / n}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / "data" / "emails_unlabelled.jsonl")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    ap.add_argument("--report", action="store_true", help="print token lengths of data/emails.csv rows")
    args = ap.parse_args(argv)
    path = train_tokenizer(corpus_sentences(args.corpus), args.out_dir, args.vocab_size)
    print(f"{path}: vocab {args.vocab_size}")
    if args.report:
        print(json.dumps(length_report(args.out_dir, ROOT / "data" / "emails.csv")))


if __name__ == "__main__":
    main()
