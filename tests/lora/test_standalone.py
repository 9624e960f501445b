"""`import lora` alone: a fresh interpreter without llama/quant/bitsandbytes runs the docs/lora.md example."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    BLOCKED = ("llama", "quant", "finetune", "bitsandbytes", "transformers", "peft")
    for name in BLOCKED:
        sys.modules[name] = None  # any `import name` now raises ImportError
    sys.path.insert(0, {root!r})
    import torch
    import lora

    example = open({doc!r}, encoding="utf-8").read()
    code = __import__("re").search(r"```python\\n(.*?)```", example, __import__("re").S).group(1)
    ns = {{}}
    exec(compile(code, "docs/lora.md", "exec"), ns)
    model, x, y = ns["model"], ns["x"], ns["y"]
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(model(x), y).item()
        with lora.disable_adapter(model):  # the frozen base alone = the starting point
            start = torch.nn.functional.cross_entropy(model(x), y).item()
    print(f"LOSS {{start:.4f}} -> {{final:.4f}}")
    assert final < 0.8 * start, (start, final)
    assert all(m.merged for m in lora.lora_modules(model).values())
    # The saved adapter reloads strictly into a fresh copy of the architecture.
    torch.manual_seed(0)
    fresh = torch.nn.Sequential(*[type(m.base)(m.base.in_features, m.base.out_features)
                                  if isinstance(m, lora.LoRALinear) else m for m in model])
    lora.load_adapter(fresh, "my_adapter")
    assert sorted(lora.lora_modules(fresh)) == ["0", "2", "4"]
    loaded = [name for name, mod in sys.modules.items() if mod is not None and name.split(".")[0] in BLOCKED]
    assert not loaded, loaded
    print("OK")
""")


def test_readme_example_runs_without_the_rest_of_the_project(tmp_path):
    doc = ROOT / "docs" / "lora.md"
    assert re.search(r"```python\n", doc.read_text(encoding="utf-8"))
    script = SCRIPT.format(root=str(ROOT), doc=str(doc))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
    assert (tmp_path / "my_adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my_adapter" / "adapter_config.json").is_file()
