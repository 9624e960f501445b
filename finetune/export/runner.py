"""What ``export.py`` does: base + adapter -> a merged HF directory, or a GGUF file and its Modelfile.

Everything that can be refused in a second is refused before the model loads: the format and GGUF type,
the family, an existing output (without ``--force`` nothing is touched), an adapter whose shapes do not fit
the base. The result is written under a temporary name beside the output and renamed into place only when
complete, so a full disk or an I/O error leaves no half file (one line, exit 2). With ``--force`` the old
output is replaced only by a complete new one.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError  # safetensors reports its I/O errors as this, not OSError
from tqdm import tqdm

import llama
import lora
from finetune import files, preflight
from finetune.config import RunConfig
from finetune.errors import UserError
from finetune.evaluate.evaluator import check_adapter, load_for_eval, resolve_weights
from finetune.export import gguf_file, ollama
from lora.export import _merged_tensors  # the merge stream merge_and_export writes from

FORMATS = ("hf", "gguf")
Log = Callable[[str], None]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def check_request(fmt: str, gguf_type: str | None) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not supported; choose one of: {', '.join(FORMATS)}")
    if fmt == "gguf":
        gguf_file.check_gguf_type(gguf_type or "f16")
    elif gguf_type is not None:
        raise UserError("--gguf-type applies to --format gguf only; drop it for --format hf")


def check_output(output: Path, fmt: str, force: bool) -> list[Path]:
    """The paths the export will write; refused (nothing touched) when one exists and ``force`` is off."""
    targets = [output] if fmt == "hf" else [output, output.parent / "Modelfile"]
    if fmt == "gguf" and output.is_dir():
        raise UserError(f"--output {output} is a directory; for --format gguf give the file to write, "
                        f"e.g. {output / 'model.gguf'}")
    existing = [p for p in targets if p.exists() or p.is_symlink()]
    if existing and not force:
        raise UserError(f"{existing[0]} already exists; pass --force to replace it or choose another "
                        "--output (nothing was changed)")
    if fmt == "hf" and output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; --format hf writes a directory")
    parent = output.parent
    files.check_writable_dir(parent, "output folder")
    return targets


def run_export(cfg: RunConfig, fmt: str, output: str, *, adapter: str | None = None,
               gguf_type: str | None = None, force: bool = False, progress: bool = True,
               log: Log = print) -> Path:
    """Write the export; returns its path (a directory for hf, the .gguf file for gguf)."""

    check_request(fmt, gguf_type)
    gguf_type = gguf_type or "f16"
    out = Path(output).expanduser().absolute()
    model_path, adapter_dir = resolve_weights(cfg, adapter)
    preflight.check_model_weights(model_path)
    mcfg = llama.LlamaConfig.from_hf(model_path)
    if fmt == "gguf":
        gguf_file.arch_of(mcfg.model_type)
    check_output(out, fmt, force)
    if adapter_dir is not None:
        check_adapter(cfg, adapter_dir)
    tok = llama.Tokenizer.from_pretrained(model_path)
    t0 = time.perf_counter()
    model = load_for_eval(cfg, model_path, adapter_dir)
    what = f"{model_path}" + (f" + {adapter_dir}" if adapter_dir else "")
    if fmt == "hf":
        _write_hf(model, Path(model_path), out, force=force)
        log(f"wrote {out} (HF model directory, {_human(_size(out))}) from {what} in "
            f"{time.perf_counter() - t0:.1f} s")
        return out
    name = Path(model_path).name + (f"+{adapter_dir.name}" if adapter_dir else "")
    n = _write_gguf(model, mcfg, tok, base_dir=Path(model_path), out=out, gguf_type=gguf_type, name=name,
                            progress=progress)
    modelfile = out.parent / "Modelfile"
    files.guarded(lambda: files.write_text_atomic(modelfile, ollama.modelfile_text(out.name, tok, cfg.data)),
                  f"write {modelfile}", "free space or choose another --output")
    log(f"wrote {out} (GGUF {gguf_type}, {n} tensors, {_human(_size(out))}) from {what} in "
        f"{time.perf_counter() - t0:.1f} s")
    log(f"wrote {modelfile}; try it: {ollama.create_hint(modelfile, _ollama_name(out))}")
    return out


def _ollama_name(out: Path) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in out.stem.lower()) or "model"


def _write_hf(model: Any, base_dir: Path, out: Path, *, force: bool) -> None:


    tmp = files.make_temp_dir(out.parent, out.name)
    try:
        lora.merge_and_export(model, tmp, base_dir)
        _replace(tmp, out, force)
    except (OSError, SafetensorError) as e:
        files.remove_path(tmp)
        why = files.describe_os_error(e) if isinstance(e, OSError) else str(e).rpartition("I/O error: ")[2]
        raise UserError(f"could not write the HF export {out}: {why}; nothing was left behind; free space "
                        "or choose another --output") from None
    except BaseException:
        files.remove_path(tmp)
        raise


def _replace(tmp: Path, out: Path, force: bool) -> None:
    """Move the complete ``tmp`` to ``out``; an old ``out`` (``force``) is removed only after the swap."""
    if force and (out.exists() or out.is_symlink()):
        old = out.parent / f"{files.TMP_PREFIX}old-{out.name}.{os.getpid()}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        files.remove_path(old)
    else:
        os.replace(tmp, out)


def _write_gguf(model: Any, mcfg: Any, tok: Any, *, base_dir: Path, out: Path, gguf_type: str, name: str,
                progress: bool) -> int:


    tmp = out.parent / f"{files.TMP_PREFIX}{out.name}.{os.getpid()}"
    files.remove_path(tmp)
    bar = tqdm(desc=f"writing {out.name}", unit="tensor", disable=not progress, file=sys.stderr)

    def step(i: int, total: int, tensor: str) -> None:
        bar.total = total
        bar.update(1)

    try:
        n = gguf_file.write_gguf(tmp, lambda: _merged_tensors(model, torch.float32), mcfg, tok=tok,
                                 model_dir=base_dir, gguf_type=gguf_type, name=name, progress=step)
        bar.close()
        files.fsync_path(tmp)
        _replace(tmp, out, True)
        return n
    except OSError as e:
        bar.close()
        files.remove_path(tmp)
        raise UserError(f"could not write {out}: {files.describe_os_error(e)}; no partial file was left; "
                        "free space or choose another --output") from None
    except BaseException:
        bar.close()
        files.remove_path(tmp)
        raise
