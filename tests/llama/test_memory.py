"""The loader never holds two copies of the model, and with a hook never the full-precision model.

Peak RSS (VmHWM) is measured in a fresh subprocess, on a checkpoint of ~48 MB so that a second
copy would stand far above allocator noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

import hf_fixtures
import pytest
import torch
from torch import nn

import llama

ROOT = Path(__file__).resolve().parents[2]
linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
# ~12M parameters, 48 MB in fp32; many small layers so that no single tensor (whose file pages,
# fp32 copy and hooked copy coexist for a moment) is a visible fraction of the model.
MEDIUM = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=16,
              num_attention_heads=4, num_key_value_heads=2)

CHILD = r"""
import json, sys
import torch
import llama

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

def to_bf16(name, linear):
    return linear.to(torch.bfloat16)  # in place: the fp32 tensors are released

# Warm-up on a tiny checkpoint: one-time costs (the first meta-device normal_() imports torch's
# decompositions, ~70 MB; library code pages) are not the model's.
llama.from_pretrained(sys.argv[3], linear_hook=to_bf16)
before = status("VmRSS")
try:  # reset the peak to now (Linux >= 4.0); else VmHWM >= before and we overestimate, never under
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
model = llama.from_pretrained(sys.argv[1], linear_hook=to_bf16 if sys.argv[2] == "bf16" else None)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the (large) pytest parent.
peak = status("VmHWM")
final = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict().values()}.values())
print(json.dumps({"growth": peak - before, "final": final}))
"""


@pytest.fixture(scope="module")
def medium_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_fixtures.make_hf_checkpoint(tmp_path_factory.mktemp("medium"), max_shard_size="20MB", **MEDIUM)


def _measure(path: Path, mode: str, warm_up: Path) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(warm_up)], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""},
                         timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@linux_only
def test_peak_rss_growth_is_about_one_model(medium_dir, tiny_model_dir):
    stored = sum(f.stat().st_size for f in medium_dir.glob("*.safetensors"))
    got = _measure(medium_dir, "plain", tiny_model_dir)
    assert got["final"] > 40e6 and abs(got["final"] - stored) < 1e6
    assert got["growth"] <= 1.3 * got["final"], got


@linux_only
def test_peak_rss_growth_with_hook_stays_below_the_full_precision_model(medium_dir, tiny_model_dir):
    got = _measure(medium_dir, "bf16", tiny_model_dir)
    full_precision = sum(f.stat().st_size for f in medium_dir.glob("*.safetensors"))
    assert got["final"] < 0.65 * full_precision  # linears now in bf16
    assert got["growth"] <= 1.3 * got["final"] < full_precision, got


def test_hooked_full_precision_weights_are_freed_one_by_one(tiny_sharded_model_dir):
    """Each linear's fp32 tensors are dead by the time the next hook call comes."""
    alive: list[weakref.ref] = []
    most_alive = 0

    def hook(name: str, linear: nn.Linear) -> nn.Module:
        nonlocal most_alive
        most_alive = max(most_alive, sum(r() is not None for r in alive))
        alive.extend(weakref.ref(p) for p in (linear.weight, linear.bias) if p is not None)
        small = nn.Linear(linear.in_features, linear.out_features, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            small.weight.copy_(linear.weight)
        return small

    model = llama.from_pretrained(tiny_sharded_model_dir, linear_hook=hook)
    assert len(alive) == 2 * 7 + 1
    assert most_alive == 0
    assert sum(r() is not None for r in alive) == 0
    assert all(m.weight.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, nn.Linear))
