"""Issue 28: running out of memory ends in the README's advice on one line, exit code 2, no traceback.

The child process caps its own address space (RLIMIT_AS, what `ulimit -v` sets) a little above what it
uses after its imports, then trains on a checkpoint whose embedding and head (2M x 64 fp32 each, 1 GiB
together) cannot fit under the cap. The file is sparse: it takes no disk space and no test memory.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
from bad_inputs_lib import REPO, one_error_line, run_cli, write_run
from safetensors.torch import load_file

from finetune.errors import OUT_OF_MEMORY_ADVICE, error_line, is_user_error

ROWS = 1 << 21  # vocabulary rows: 512 MiB per [ROWS, 64] fp32 tensor
# address space allowed above what the child holds after its imports: 256 MiB fails safetensors' mmap
# of the 1 GiB file for the headers (MemoryError); 1.25 GiB gets past the headers and fails inside torch
# (a RuntimeError: "unable to mmap ... Cannot allocate memory" as a tensor is read, or the allocator's
# "DefaultCPUAllocator: can't allocate memory" as it is copied)
HEADROOMS = {"headers": 256 << 20, "tensors": 1280 << 20}
SKIP = 77

CHILD = f"""
import resource, runpy, sys
sys.path.insert(0, {str(REPO)!r})
import torch, llama, finetune.config  # the imports are not what is limited
try:
    status = open("/proc/self/status").read().splitlines()
except OSError as e:
    print(f"cannot read /proc/self/status ({{e}})"); sys.exit({SKIP})
used = int(next(line for line in status if line.startswith("VmSize:")).split()[1]) * 1024
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
limit = used + int(sys.argv.pop(1))
if hard != resource.RLIM_INFINITY and hard < limit:
    print(f"the hard RLIMIT_AS {{hard}} is below {{limit}}"); sys.exit({SKIP})
try:
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
except (ValueError, OSError) as e:
    print(f"setrlimit(RLIMIT_AS) refused: {{e}}"); sys.exit({SKIP})
sys.argv = [{str(REPO / "train.py")!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def sparse_big_vocab_checkpoint(tiny: Path, out: Path) -> Path:
    """The tiny model with ROWS-row embedding and head; their data is a hole at the end of the file."""
    shutil.copytree(tiny, out)
    small = load_file(tiny / "model.safetensors")
    hidden = small["model.embed_tokens.weight"].shape[1]
    big = ("model.embed_tokens.weight", "lm_head.weight")
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in sorted(small.items()):
        if name in big:
            continue
        data = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    for name in big:
        size = ROWS * hidden * 4
        header[name] = {"dtype": "F32", "shape": [ROWS, hidden], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with (out / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
        f.truncate(8 + len(text) + offset)
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] = ROWS
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status: Linux")
@pytest.mark.parametrize("where, detail", [("headers", "(MemoryError: "), ("tensors", "(RuntimeError: ")])
def test_out_of_memory_under_a_memory_limit_is_the_readme_advice(tiny_model_dir, tmp_path, where, detail):
    model = sparse_big_vocab_checkpoint(tiny_model_dir, tmp_path / "model")
    config = write_run(tmp_path, model)
    child = tmp_path / "limited_train.py"
    child.write_text(CHILD)
    proc, seconds = run_cli([str(child), str(HEADROOMS[where]), str(config), "--no-progress"])
    if proc.returncode == SKIP:
        pytest.skip(f"cannot cap the address space here: {proc.stdout.strip()}")
    line = one_error_line(proc, seconds, f"RLIMIT_AS above the imports (ulimit -v), fails in {where}",
                          "error: out of memory (", detail, "model.gradient_checkpointing: true",
                          "train.micro_batch_size", "ulimit -v")
    assert len(line) < 700
    run = tmp_path / "run"
    left = sorted(p.name for p in run.iterdir()) if run.exists() else None
    print(f"[issue 28] left in the run folder: {left}")
    assert not (run / ".lock").exists() and not list(run.glob(".tmp-*"))


def test_allocator_errors_are_user_errors_with_the_advice():
    torch_cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                             "memory: you tried to allocate 536870912 bytes. Error code 12 (Cannot allocate "
                             "memory)")
    for err in (MemoryError(), MemoryError("Cannot allocate memory (os error 12)"), torch_cpu,
                RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        assert is_user_error(err)
        line = error_line(err)
        assert line.startswith("error: out of memory (") and line.endswith(OUT_OF_MEMORY_ADVICE), line
        assert "\n" not in line and len(line) < 700
    assert "(MemoryError: no detail)" in error_line(MemoryError())
    import torch

    assert is_user_error(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_user_error(RuntimeError("shape mismatch"))  # other RuntimeErrors stay bugs
