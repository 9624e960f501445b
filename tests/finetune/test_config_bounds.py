"""Issue 28, run configs: a YAML document is bounded while it is read (aliases, depth, size, values
Python cannot hold), a value in an error line is bounded while it is built, and a --set path with a
control character is refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from bad_inputs_lib import one_error_line, run_cli, write_run

from finetune.config import MAX_CONFIG_BYTES, MAX_YAML_DEPTH, MAX_YAML_VALUES, _show, load_config
from finetune.errors import UserError


def bomb(levels: int = 9, width: int = 9) -> str:
    """`levels` nested anchors, each a list of `width` aliases of the one below: width**levels strings."""
    node = "&a0 [" + ", ".join(["lm_head"] * width) + "]"
    for i in range(1, levels):
        node = f"&a{i} [{node}, " + ", ".join([f"*a{i - 1}"] * (width - 1)) + "]"
    return node


def _with_quant(config: Path, extra: str) -> Path:
    text = config.read_text().replace("quant:\n  enabled: false\n", f"quant:\n  enabled: false\n  {extra}\n")
    assert extra in text
    config.write_text(text)
    return config


def _error(config: Path, overrides: list[str] | None = None) -> str:
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        load_config(config, overrides=overrides)
    seconds = time.perf_counter() - start
    line = str(info.value)
    assert "\n" not in line and len(line) < 600, line
    print(f"\n[issue 28] load_config {seconds:.3f} s: {line}")
    return line


def test_alias_bomb_in_quant_skip_is_one_line_from_train_py(tiny_model_dir, tmp_path):
    config = _with_quant(write_run(tmp_path, tiny_model_dir), f"skip: [{bomb()}, *a8]")
    proc, seconds = run_cli(["train.py", str(config), "--no-progress"])
    line = one_error_line(proc, seconds, "alias bomb (9 levels of 9, quant.skip)",
                          f"{config}: line 7", "quant.skip expands to more than", "aliases")
    assert len(line) < 400
    assert not (tmp_path / "run").exists()


def test_alias_bomb_ten_levels_and_in_a_set_value(tiny_model_dir, tmp_path):
    config = write_run(tmp_path, tiny_model_dir)
    ten = _with_quant(write_run(tmp_path, tiny_model_dir, name="ten.yaml"), f"skip: [{bomb(10)}]")
    assert f"more than {MAX_YAML_VALUES} values" in _error(ten)
    line = _error(config, [f"quant.skip=[{bomb()}]"])
    assert line.startswith("--set 'quant.skip=[&a8") and "expands to more than" in line
    line = _error(config, [f"data.instruction=[{bomb()}]"])  # a string key: still refused, not kept as text
    assert "expands to more than" in line


@pytest.mark.parametrize("extra, words", [
    ("skip: &r [*r]", ["line 7", "contains itself"]),
    ("skip: " + "[" * 5000 + "]" * 5000, [f"nested deeper than {MAX_YAML_DEPTH} levels"]),
    ("blocksize: " + "6" * 5000, ["cannot read the value '666", "over 4300 digits"]),
    ("skip: [2020-13-45]", ["cannot read the value '2020-13-45'", "month must be in 1..12"]),
    ("blocksize: 0x" + "f" * 5000, ["cannot read the value '0xfff", "over 4300 digits"]),
    ("{[a]: 1}: 2", ["found unhashable key"]),
])
def test_documents_python_cannot_hold_are_one_line(tiny_model_dir, tmp_path, extra, words):
    line = _error(_with_quant(write_run(tmp_path, tiny_model_dir), extra))
    assert "invalid YAML" in line and all(w in line for w in words), line


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# x\n" * (MAX_CONFIG_BYTES // 4 + 1))
    assert f"at most {MAX_CONFIG_BYTES} bytes" in _error(big)


def test_error_values_are_bounded_while_built():
    shared = ["lm_head"] * 1000
    huge = [shared] * 1_000_000  # 10**9 strings by reference
    start = time.perf_counter()
    text = _show(huge)
    assert time.perf_counter() - start < 0.5
    assert len(text) == 80 and text.endswith("...") and text.startswith("[['lm_head', 'lm_head'")
    looped: list = []
    looped.append(looped)
    assert len(_show(looped)) <= 80
    assert _show({"a": [1, (2,)], "b": None}) == repr({"a": [1, (2,)], "b": None})
    assert _show(10 ** 5000) == "<an integer of about 5001 digits>"


def test_set_path_with_a_newline_is_refused_not_folded_into_another_file(tiny_model_dir, tmp_path):
    config = write_run(tmp_path, tiny_model_dir)
    data = tmp_path / "data.csv"
    other = tmp_path / "data.csv other"  # what YAML would read "data.csv<newline>other" as
    other.write_bytes(data.read_bytes())
    proc, seconds = run_cli(["train.py", str(config), "--no-progress", "--set", f"data.path={data}\nother"])
    one_error_line(proc, seconds, "--set path with a newline", "data.path holds the control character '\\n'",
                   "on one line")
    assert not (tmp_path / "run").exists()
    for item, words in [(f"train.output_dir={tmp_path}/a\rb", ["train.output_dir holds", "'\\r'"]),
                        (f"eval.adapter={tmp_path}/x\x00", ["eval.adapter holds", "'\\x00'"]),
                        ("train\n.lr=1e-4", ["the key holds the control character '\\n'"])]:
        line = _error(config, [item])
        assert all(w in line for w in words), line
    load_config(config, overrides=["data.instruction=a\nb"])  # not a path: control characters allowed
