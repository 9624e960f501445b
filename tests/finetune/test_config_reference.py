"""One source for the config reference: the README's table is generated from finetune/config.py (fields,
types, defaults, field comments) by scripts/config_reference.py, and configs/llama2.yaml spells out
exactly the dataclass fields."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import yaml

from finetune.config import SECTIONS

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


def test_readme_config_table_is_the_generated_one():
    _, section, _ = reference.split_readme((REPO / "README.md").read_text(encoding="utf-8"))
    assert section == reference.generate(), "README.md is stale: run python scripts/config_reference.py"


def test_every_field_has_a_row_with_its_default_and_comment():
    generated = reference.generate()
    for name, cls in SECTIONS.items():
        comments = reference.field_comments(cls)
        for f in dataclasses.fields(cls):
            assert comments[f.name], f"{name}.{f.name} has no comment in {cls.__name__}"
            assert f"| `{name}.{f.name}` |" in generated
    assert "| `quant.skip` | list[str] | `[lm_head, embed_tokens]` | module-name patterns" in generated
    assert "| `train.resume` | bool or auto | `false` |" in generated
    assert "| `train.max_steps` | int or null, >= 1 | `null` |" in generated


def test_check_fails_on_a_stale_table_and_the_rewrite_fixes_it(tmp_path, capsys):
    readme = tmp_path / "README.md"
    good = (REPO / "README.md").read_text(encoding="utf-8")
    readme.write_text(good.replace("| adapter rank |", "| the rank |"), encoding="utf-8")
    assert reference.main(["--check", "--readme", str(readme)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert reference.main(["--readme", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == good
    assert reference.main(["--check", "--readme", str(readme)]) == 0


def test_llama2_yaml_has_every_field_and_only_fields_in_order():
    raw = yaml.safe_load((REPO / "configs" / "llama2.yaml").read_text(encoding="utf-8"))
    assert list(raw) == list(SECTIONS)
    for name, cls in SECTIONS.items():
        fields = [f.name for f in dataclasses.fields(cls)]
        keys = list(raw[name])
        missing, unknown = set(fields) - set(keys), set(keys) - set(fields)
        assert not missing, f"configs/llama2.yaml lacks these {name} fields: {sorted(missing)}"
        assert not unknown, f"configs/llama2.yaml: these {name} keys are not fields: {sorted(unknown)}"
        assert keys == fields, f"configs/llama2.yaml: {name} keys not in the dataclass order"
