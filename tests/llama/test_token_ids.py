"""Issue 28: the token ids of generation_config.json and config.json are checked when the tokenizer
loads; `eos_token_id: [2, "x", null]` used to end eval.py in a TypeError traceback (sorting the stop
ids), and now is one line naming the file, the item and its value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bad_inputs_lib import one_error_line, run_cli, write_run

import llama
from llama.tokenizer import TokenizerError


def _copy_with(tiny: Path, tmp: Path, file: str, **change) -> Path:
    model = Path(shutil.copytree(tiny, tmp / "model"))
    cfg = json.loads((model / file).read_text())
    cfg.update(change)
    (model / file).write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize("file", ["generation_config.json", "config.json"])
def test_a_bad_eos_list_is_one_line_from_eval_py(tiny_model_dir, tmp_path, file):
    model = _copy_with(tiny_model_dir, tmp_path, file, eos_token_id=[2, "x", None])
    config = write_run(tmp_path, model)
    proc, seconds = run_cli(["eval.py", str(config), "--baseline", "--no-progress"])
    one_error_line(proc, seconds, f"eos_token_id [2, 'x', null] in {file}", f"{model / file}: item 1 of "
                   "eos_token_id is 'x', not a token id (an integer >= 0)")


@pytest.mark.parametrize("value, shown", [
    (True, "eos_token_id is true"), (2.0, "eos_token_id is 2.0"), (-1, "eos_token_id is -1"),
    ({"id": 2}, "eos_token_id is a JSON object"), ([2, [3]], "item 1 of eos_token_id is a JSON array"),
    ([2, None], "item 1 of eos_token_id is null"), ("x" * 10000, "eos_token_id is 'xxxxxxxxxxxxxxxxx"),
])
def test_every_kind_of_bad_stop_id_names_its_value(tiny_model_dir, tmp_path, value, shown):
    model = _copy_with(tiny_model_dir, tmp_path, "generation_config.json", eos_token_id=value)
    with pytest.raises(TokenizerError) as info:
        llama.Tokenizer.from_pretrained(model)
    msg = str(info.value)
    assert shown in msg and "\n" not in msg and len(msg) < 400, msg


def test_good_ids_still_load(tiny_model_dir, tmp_path):
    model = _copy_with(tiny_model_dir, tmp_path, "generation_config.json", eos_token_id=[2, 5],
                       bos_token_id=None)
    assert llama.Tokenizer.from_pretrained(model).stop_ids == [2, 5]
    cfg = json.loads((model / "config.json").read_text())
    cfg["pad_token_id"] = -1  # old conversions wrote it; it means "none"
    (model / "config.json").write_text(json.dumps(cfg))
    llama.Tokenizer.from_pretrained(model)
