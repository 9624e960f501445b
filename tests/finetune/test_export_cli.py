"""export.py end to end (subprocess, the real CLI) on tiny models: the outputs, and every bad input:
an existing output (refused without --force, nothing touched), an unknown --gguf-type or family, an
adapter for another base, an I/O error while writing (a real one: the file-size limit), no half file."""

from __future__ import annotations

import resource
import signal
from pathlib import Path

import hf_fixtures
import pytest
import torch
from export_testlib import error_line, make_model, run_cli, save_adapter, write_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_cli")
    model_dir = make_model(root, "llama-spm")
    adapter = save_adapter(model_dir, root / "adapter")
    return root, model_dir, adapter, write_config(root / "run.yaml", model_dir, root / "run")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_gguf_export_writes_the_file_and_a_modelfile(setup, tmp_path):
    import gguf

    _, _, adapter, cfg = setup
    r = run_cli("export.py", cfg, "--format", "gguf", "--adapter", adapter, "--gguf-type", "q8_0",
                "--output", tmp_path / "m.gguf", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "GGUF q8_0" in r.stdout and "ollama create" in r.stdout
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.gguf\n")
    assert 'TEMPLATE """Testo: {{ .Prompt }}\nEntità:\n{{ .Response }}"""' in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile
    assert not list(tmp_path.glob(".tmp-*"))


def test_hf_export_is_a_directory_transformers_loads_with_the_merged_weights(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    import llama
    import lora

    _, model_dir, adapter, cfg = setup
    r = run_cli("export.py", cfg, "--format", "hf", "--adapter", adapter, "--output", tmp_path / "hf",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = llama.from_pretrained(str(model_dir))
    lora.load_adapter(ours, adapter)  # fp32 base here; the export's base was 4-bit: compare loosely
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 0.5


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_existing_output_is_refused_without_force_and_untouched(setup, tmp_path, fmt):
    _, _, adapter, cfg = setup
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "hf")
    if fmt == "gguf":
        out.write_bytes(b"precious")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    before = _snapshot(tmp_path)
    r = run_cli("export.py", cfg, "--format", fmt, "--adapter", adapter, "--output", out, "--no-progress")
    assert r.returncode == 2
    assert "already exists" in error_line(r.stderr) and "--force" in error_line(r.stderr)
    assert _snapshot(tmp_path) == before
    r = run_cli("export.py", cfg, "--format", fmt, "--adapter", adapter, "--output", out, "--force",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    assert _snapshot(tmp_path) != before and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("bad", [("--gguf-type", "q5_k"), ("--format", "onnx")])
def test_unsupported_type_or_format_lists_the_supported_ones(setup, tmp_path, bad):
    _, _, adapter, cfg = setup
    args = ["--format", "gguf", *bad] if bad[0] == "--gguf-type" else list(bad)
    r = run_cli("export.py", cfg, *args, "--adapter", adapter, "--output", tmp_path / "m.gguf")
    assert r.returncode == 2
    line = error_line(r.stderr)
    assert ("f32, f16, bf16, q8_0, q4_0" in line) if bad[0] == "--gguf-type" else ("hf, gguf" in line)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_family_is_one_line_and_hf_still_works(setup, tmp_path):
    root = setup[0]
    phi = make_model(root, "phi")
    cfg = write_config(tmp_path / "phi.yaml", phi, tmp_path / "run", quant=False)
    r = run_cli("export.py", cfg, "--format", "gguf", "--adapter", "none", "--output", tmp_path / "p.gguf")
    assert r.returncode == 2
    assert "not supported for the 'phi' family" in error_line(r.stderr)
    assert "llama, mistral, qwen2" in error_line(r.stderr)
    assert not (tmp_path / "p.gguf").exists()
    r = run_cli("export.py", cfg, "--format", "hf", "--adapter", "none", "--output", tmp_path / "hf",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "config.json").is_file()


def test_adapter_for_another_base_is_the_shape_error(setup, tmp_path):
    _, _, _, cfg = setup
    other = hf_fixtures.make_hf_checkpoint(tmp_path / "other", hidden_size=32, intermediate_size=64)
    adapter = save_adapter(other, tmp_path / "other-adapter")
    r = run_cli("export.py", cfg, "--format", "gguf", "--adapter", adapter, "--output", tmp_path / "m.gguf")
    assert r.returncode == 2
    line = error_line(r.stderr)
    assert "cannot use adapter" in line and "shape" in line
    assert not (tmp_path / "m.gguf").exists()


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG (a real I/O error)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_io_error_while_writing_leaves_no_half_file(setup, tmp_path, fmt):
    _, _, adapter, cfg = setup
    out = tmp_path / "out" / ("m.gguf" if fmt == "gguf" else "hf")
    r = run_cli("export.py", cfg, "--format", fmt, "--gguf-type", "f32", "--adapter", adapter, "--output",
                out, "--no-progress", preexec=_file_size_limit(100_000)) if fmt == "gguf" else \
        run_cli("export.py", cfg, "--format", fmt, "--adapter", adapter, "--output", out, "--no-progress",
                preexec=_file_size_limit(100_000))
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    assert "could not write" in line and ("no partial file" in line or "nothing was left" in line)
    assert list(out.parent.iterdir()) == []
