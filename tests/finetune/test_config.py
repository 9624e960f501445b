"""finetune.config: YAML -> validated dataclasses, --set overrides, resolved save, one-line errors."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from finetune.config import (
    DataConfig,
    LoraConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    save_config,
)
from finetune.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    """A model dir with a config.json and a data file: enough for the path checks (no weights needed)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "rows.csv"
    data.write_text("input_text,output_text\nciao,x\n")
    return {"model": model, "data": data, "root": tmp_path}


def write(tmp: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def load_with(paths: dict[str, Path], extra: str = "", overrides: list[str] | None = None) -> RunConfig:
    """The minimal valid config with the sections of `extra` (YAML) merged in."""
    raw = {"model": {"path": str(paths["model"])}, "data": {"path": str(paths["data"])}}
    for section, values in (yaml.safe_load(extra) or {}).items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return load_config(write(paths["root"], yaml.safe_dump(raw)), overrides=overrides)


def user_error(fn, *args, **kwargs) -> str:
    """Run fn, require a UserError, and require that its message is a single line."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip()
    return message


# ---------------------------------------------------------------------------------------------------
# the contract


def test_llama2_yaml_is_the_seeds_recipe_with_every_knob_commented():
    path = REPO / "configs" / "llama2.yaml"
    cfg = load_config(path, check_paths=False)
    assert cfg.model.path.endswith("models/Llama-2-7b-hf") and cfg.model.dtype == "bfloat16"
    assert (cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps) == (1, 16)
    assert cfg.train.lr == 4e-5 and cfg.train.optimizer == "adamw"
    assert (cfg.train.logging_steps, cfg.train.eval_steps, cfg.train.save_steps) == (50, 50, 50)
    assert cfg.data.max_length == 128 and cfg.data.template == "alpaca"
    assert cfg.quant.enabled and cfg.quant.quant_type == "nf4" and cfg.quant.double_quant
    assert cfg.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32.0, 0.05)
    assert cfg.train.seed == 42 and cfg.data.shuffle_seed == 42
    assert (cfg.data.train_size, cfg.data.test_size) == (4000, 1500)
    # each knob on its own line with a comment (that every field is here: test_config_reference.py)
    for line in path.read_text().splitlines():
        if re.match(r"^\s+\w+:", line):
            assert "#" in line, f"knob without a comment: {line!r}"


def test_save_and_reload_round_trip_with_paths_resolved_from_cwd(paths, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = "model: {path: model}\ndata: {path: rows.csv}\ntrain: {output_dir: runs/x, lr: 1e-4}\n"
    cfg = load_config(write(tmp_path, text), overrides=["lora.r=8"])
    assert cfg.model.path == str(tmp_path / "model")
    assert cfg.data.path == str(tmp_path / "rows.csv")
    assert cfg.train.output_dir == str(tmp_path / "runs" / "x")
    save_config(cfg, tmp_path / "runs" / "x" / "config.yaml")
    monkeypatch.chdir("/")  # the saved config no longer depends on the working directory
    again = load_config(tmp_path / "runs" / "x" / "config.yaml")
    assert again == cfg and again.lora.r == 8 and again.train.lr == 1e-4
    assert isinstance(cfg.to_dict()["train"], dict)


# ---------------------------------------------------------------------------------------------------
# types


def test_type_coercion_rules(paths):
    cfg = load_with(paths, "train: {lr: 4e-5, max_grad_norm: 2}\nlora: {alpha: 32}\n")
    # YAML 1.1 reads 4e-5 as the *string* '4e-5'; floats accept it, and ints where floats are expected
    assert cfg.train.lr == 4e-5 and isinstance(cfg.train.lr, float)
    assert cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.train.max_grad_norm == 2.0
    assert load_with(paths, "lora: {targets: '^model.*proj$'}\n").lora.targets == "^model.*proj$"
    assert load_with(paths, "train: {resume: auto}\n").train.resume == "auto"
    assert load_with(paths, "train: {resume: true}\n").train.resume is True


WRONG_TYPES = [  # each error names the key, what was expected and the value found
    ("lora: {r: sixteen}", "lora.r must be an integer, got 'sixteen'"),
    ("lora: {r: 16.0}", "lora.r must be an integer, got 16.0"),
    ("data: {max_length: true}", "data.max_length must be an integer, got True"),
    ("quant: {enabled: 'true'}", "quant.enabled must be true or false, got 'true'"),
    ("quant: {enabled: 1}", "quant.enabled must be true or false, got 1"),
    ("train: {lr: [1]}", "train.lr must be a number, got [1]"),
    ("train: {lr: fast}", "train.lr must be a number, got 'fast'"),
    ("train: {lr: .nan}", "train.lr must be a finite number"),
    ("train: {max_steps: 1.5}", "train.max_steps must be an integer or null, got 1.5"),
    ("lora: {targets: [1, 2]}", "lora.targets must be a list of strings or a string, got [1, 2]"),
    ("quant: {skip: lm_head}", "quant.skip must be a list of strings, got 'lm_head'"),
    ("data: {instruction: 3}", "data.instruction must be a string, got 3"),
]


# ---------------------------------------------------------------------------------------------------
# unknown keys, impossible values


UNKNOWN_KEYS = [  # each error suggests the nearest valid key
    ("lora: {rr: 8}", "unknown key 'lora.rr'; did you mean 'lora.r'?"),
    ("lora: {lr: 1.0e-4}", "unknown key 'lora.lr'; did you mean 'train.lr'?"),
    ("train: {gradient_accumulation: 4}", "did you mean 'train.gradient_accumulation_steps'?"),
    ("trian: {lr: 1.0e-4}", "unknown section 'trian'; did you mean 'train'?"),
    ("train: {zzz: 1}", "unknown key 'train.zzz' (valid keys: output_dir, micro_batch_size"),
]


@pytest.mark.parametrize("extra, expected", WRONG_TYPES + UNKNOWN_KEYS)
def test_wrong_types_and_unknown_keys_name_the_key(paths, extra, expected):
    assert expected in user_error(load_with, paths, extra + "\n")


@pytest.mark.parametrize("extra, expected", [
    ("lora: {r: 0}", "lora.r must be a positive integer, got 0"),
    ("lora: {r: -4}", "lora.r must be a positive integer, got -4"),
    ("lora: {alpha: 0}", "lora.alpha must be > 0"),
    ("lora: {dropout: 1.0}", "lora.dropout must be in [0, 1), got 1.0"),
    ("lora: {dropout: -0.1}", "lora.dropout must be in [0, 1)"),
    ("lora: {targets: []}", "lora.targets must be a non-empty list"),
    ("lora: {targets: 'q_proj('}", "lora.targets is not a valid regex"),
    ("train: {lr: 0}", "train.lr must be > 0, got 0.0"),
    ("train: {lr: -1.0e-4}", "train.lr must be > 0"),
    ("train: {gradient_accumulation_steps: 0}", "train.gradient_accumulation_steps must be >= 1, got 0"),
    ("train: {micro_batch_size: 0}", "train.micro_batch_size must be >= 1"),
    ("train: {save_steps: 0}", "train.save_steps must be >= 1"),
    ("train: {eval_steps: 0}", "train.eval_steps must be >= 1"),
    ("train: {logging_steps: 0}", "train.logging_steps must be >= 1"),
    ("train: {epochs: 0}", "train.epochs must be > 0"),
    ("train: {max_grad_norm: 0}", "train.max_grad_norm must be > 0, or null"),
    ("train: {max_steps: 0}", "train.max_steps must be >= 1 or null"),
    ("train: {warmup_steps: -1}", "train.warmup_steps must be >= 0"),
    ("train: {optimizer: adam}", "train.optimizer must be one of adamw, adamw8bit, paged_adamw8bit, "
                                 "got 'adam'; did you mean 'adamw'?"),
    ("train: {scheduler: cosin}", "did you mean 'cosine'?"),
    ("train: {amp: bf32}", "train.amp must be one of auto, bf16, fp16, fp32"),
    ("train: {resume: maybe}", "train.resume must be true, false or auto, got 'maybe'"),
    ("quant: {quant_type: nf3}", "quant.quant_type must be one of nf4, fp4, got 'nf3'"),
    ("quant: {blocksize: 48}", "quant.blocksize must be a power of two"),
    ("lora: {enabled: false}", "4-bit weights cannot be trained"),
    ("model: {dtype: bf16}", "model.dtype must be one of bfloat16, float16, float32"),
    ("model: {device: gpu}", "model.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("data: {max_length: 8}", "data.max_length is too small"),
    ("data: {format: xlsx}", "data.format must be one of auto, csv, jsonl, json"),
    ("data: {train_size: 0}", "data.train_size must be >= 1 or null"),
    ("data: {test_size: -1}", "data.test_size must be >= 0 or null"),
    ("data: {template: alpacca}", "data.template 'alpacca' is not a known template (alpaca, llama2-chat, "
                                  "chat) nor a custom string containing {input}; did you mean 'alpaca'?"),
    ("data: {template: 'Q: {instruction} A: {output}'}", "data.template must contain {input}"),
    ("data: {template: 'Q: {inptu} A:'}", "unknown placeholder {inptu}"),
    ("data: {template: '{output} after {input}'}", "{output} only at its very end"),
    ("data: {template: '<s>{input} {output}</s>'}", "must not contain literal <s> or </s>"),
    ("data: {template: 'Q: {input'}", "data.template is not a valid format string"),
    ("eval: {max_new_tokens: 0}", "eval.max_new_tokens must be >= 1"),
    ("eval: {split: dev}", "eval.split must be one of test, train"),
])
def test_impossible_values_are_one_clear_line(paths, extra, expected):
    message = user_error(load_with, paths, extra + "\n")
    assert expected in message
    assert message.startswith(str(paths["root"] / "run.yaml"))  # says which file


def test_quant_off_allows_full_training(paths):
    cfg = load_with(paths, "quant: {enabled: false}\nlora: {enabled: false}\n")
    assert not cfg.lora.enabled and not cfg.quant.enabled


def test_custom_templates_that_are_valid(paths):
    for template in ("Testo: {input}\nEntità:\n{output}", "{instruction}\n{input}\n", "{{json}}: {input}"):
        assert load_with(paths, f"data: {{template: {json.dumps(template)}}}\n").data.template == template


# ---------------------------------------------------------------------------------------------------
# files and paths


def test_missing_files_and_dirs(paths):
    root, model, data = paths["root"], paths["model"], paths["data"]
    (root / "empty_model").mkdir()

    def load(model_path, data_path, **kwargs):
        lines = [f"model: {{path: {model_path}}}" if model_path else "",
                 f"data: {{path: {data_path}}}" if data_path else ""]
        return load_config(write(root, "\n".join(lines) + "\n"), **kwargs)

    assert "config file not found" in user_error(load_config, root / "nope.yaml")
    assert f"model.path {root}/missing does not exist" in user_error(load, root / "missing", data)
    assert f"model.path {data} is not a directory" in user_error(load, data, data)
    assert "has no config.json" in user_error(load, root / "empty_model", data)
    assert f"data.path {root}/x.csv does not exist" in user_error(load, model, root / "x.csv")
    assert "model.path is required" in user_error(load, None, data)
    assert "data.path is required" in user_error(load, model, None)
    # check_paths=False: tools that only read the config do not need the files
    assert load(root / "missing", root / "x.csv", check_paths=False).model.path == f"{root}/missing"


def test_bad_yaml_files(paths):
    root = paths["root"]
    assert "the config file is empty" in user_error(load_config, write(root, "# nothing\n"))
    msg = user_error(load_config, write(root, "model:\n  path: [unclosed\ndata: {}\n"))
    assert "invalid YAML" in msg and "line " in msg
    assert "the top level must be a mapping" in user_error(load_config, write(root, "- a\n- b\n"))
    assert "section 'lora' must be a mapping" in user_error(load_config, write(root, "lora: 16\n"))
    msg = user_error(load_config, write(root, "data: {path: a}\nlora: {r: 8}\ndata: {path: b}\n"))
    assert "duplicate key 'data'" in msg and "line 3" in msg
    (root / "bin.yaml").write_bytes(b"model: \xff\xfe\n")
    assert "not valid UTF-8" in user_error(load_config, root / "bin.yaml")


# ---------------------------------------------------------------------------------------------------
# --set overrides


def test_overrides_parse_values_as_yaml(paths):
    cfg = load_with(paths, "train: {lr: 4.0e-5}\n", overrides=[
        "train.lr=1e-4", "lora.r=8", "lora.targets=[q_proj,v_proj]", "train.max_steps=null",
        "eval.limit=5", "train.resume=auto", "quant.enabled=false", "lora.enabled=false",
        "data.template={input} => {output}", "data.instruction=Trova: le entità", "lora.r=4"])
    assert cfg.train.lr == 1e-4 and cfg.lora.r == 4  # the later override wins
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.train.max_steps is None
    assert cfg.eval.limit == 5 and cfg.train.resume == "auto"
    assert not cfg.quant.enabled and not cfg.lora.enabled
    # a string field keeps the raw text even where YAML would read a mapping
    assert cfg.data.template == "{input} => {output}"
    assert cfg.data.instruction == "Trova: le entità"


@pytest.mark.parametrize("override, expected", [
    ("lora.r", "--set 'lora.r': expected section.key=value"),
    ("lorar=3", "expected section.key=value"),
    ("a.b.c=1", "expected section.key=value"),
    ("lora.rr=3", "--set 'lora.rr=3': unknown key 'lora.rr'; did you mean 'lora.r'?"),
    ("lora.lr=3", "did you mean 'train.lr'?"),
    ("lroa.r=3", "unknown section 'lroa'; did you mean 'lora'?"),
    ("lora.r=[1", "cannot parse the value '[1' as YAML"),
    ("train.lr=abc", "train.lr must be a number, got 'abc'"),
    ("lora.r=0", "lora.r must be a positive integer, got 0"),
])
def test_bad_overrides(paths, override, expected):
    assert expected in user_error(load_with, paths, "", overrides=[override])


def test_programmatic_configs_are_validated(paths):
    raw = {"model": {"path": str(paths["model"])}, "data": {"path": str(paths["data"])}}
    cfg = config_from_dict(raw)
    assert cfg.lora == LoraConfig()
    assert dataclasses.replace(cfg.train, output_dir="runs/default") == TrainConfig()
    assert cfg.train.output_dir == str(Path.cwd() / "runs" / "default")
    assert dataclasses.replace(cfg.data, path="") == DataConfig()
    assert "<config>: lora.r" in user_error(config_from_dict, {**raw, "lora": {"r": 0}})
