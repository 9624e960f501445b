"""PEFT is the oracle: same A/B -> same logits; adapter files go both ways; loading is strict."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from lora_testlib import hf_llama, hf_logits, make_toy, model_and_logits, randomize_lora, randomize_peft
from safetensors.torch import load_file, save_file

import lora
from lora import LoRAError

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
IDS = torch.randint(3, 512, (2, 11), generator=torch.Generator().manual_seed(0))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def peft_load_strict(model_dir: Path, adapter_dir: Path):
    """PeftModel.from_pretrained, but a missing/unexpected key is a failure, not a warning.

    peft 0.21 reports missing adapter keys with warnings.warn("Found missing adapter keys ...") and
    ignores unexpected ones silently, so both are checked: the warning (and any logger record) is
    caught, and the loaded key set is compared with the file's.
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm = PeftModel.from_pretrained(hf_llama(model_dir), adapter_dir)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    messages = [str(w.message) for w in caught] + handler.messages
    bad = [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()]
    assert not bad, f"PEFT reported key problems: {bad}"
    file_keys = set(load_file(str(adapter_dir / "adapter_model.safetensors")))
    loaded = set(get_peft_model_state_dict(pm))
    assert loaded == file_keys, f"unexpected keys ignored by PEFT: {sorted(file_keys - loaded)}"
    return pm.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("targets", [QKVO, "all-linear"], ids=["qkvo", "all-linear"])
@pytest.mark.parametrize("backend", ["ours", "hf"])
def test_logits_equal_peft(tiny_model_dir, backend, targets, use_rslora):
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    pm = get_peft_model(hf_llama(tiny_model_dir), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, use_rslora=use_rslora)).eval()
    randomize_peft(pm)
    model, logits = model_and_logits(backend, tiny_model_dir)
    lora.inject(model, targets=targets, r=4, alpha=8, dropout=0.0, use_rslora=use_rslora)
    ours = lora.adapter_state_dict(model)
    theirs = get_peft_model_state_dict(pm)
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        v.copy_(theirs[k])
    want = hf_logits(pm, IDS)
    got = logits(model.eval(), IDS)
    with lora.disable_adapter(model):
        base = logits(model, IDS)
    assert (want - base).abs().max() > 1e-2  # the adapter matters, so equality below means something
    err = (got - want).abs().max().item()
    assert err <= 1e-4, err


@pytest.mark.parametrize("targets, use_rslora", [(QKVO, False), ("all-linear", True)], ids=["qkvo", "all"])
@pytest.mark.parametrize("backend", ["ours", "hf"])
def test_our_adapter_loads_in_peft(tiny_model_dir, tmp_path, backend, targets, use_rslora):
    model, logits = model_and_logits(backend, tiny_model_dir)
    lora.inject(model, targets=targets, r=4, alpha=16, dropout=0.05, use_rslora=use_rslora)
    randomize_lora(model)
    lora.save_adapter(model, tmp_path, base_model_name_or_path=str(tiny_model_dir))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    assert cfg["use_rslora"] is use_rslora and cfg["lora_dropout"] == 0.05
    pm = peft_load_strict(tiny_model_dir, tmp_path)
    assert pm.peft_config["default"].use_rslora is use_rslora
    err = (hf_logits(pm, IDS) - logits(model.eval(), IDS)).abs().max().item()
    assert err <= 1e-4, err


@pytest.mark.parametrize("targets, use_rslora", [(QKVO, True), ("all-linear", False)], ids=["qkvo", "all"])
@pytest.mark.parametrize("backend", ["ours", "hf"])
def test_peft_adapter_loads_in_ours(tiny_model_dir, tmp_path, backend, targets, use_rslora):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(hf_llama(tiny_model_dir), LoraConfig(
        r=8, lora_alpha=4, lora_dropout=0.1, target_modules=targets, use_rslora=use_rslora,
        task_type="CAUSAL_LM")).eval()
    randomize_peft(pm, seed=3)
    pm.save_pretrained(tmp_path)
    want = hf_logits(pm, IDS)
    model, logits = model_and_logits(backend, tiny_model_dir)
    lora.load_adapter(model, tmp_path)
    peft_names = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in pm.named_modules()
                  if n.endswith(".lora_A")}
    assert set(lora.lora_modules(model)) == peft_names
    assert all(m.r == 8 and m.use_rslora is use_rslora for m in lora.lora_modules(model).values())
    err = (logits(model.eval(), IDS) - want).abs().max().item()
    assert err <= 1e-4, err


def test_peft_guard_fails_on_a_missing_key(tiny_model_dir, tmp_path):
    """The strict PEFT wrapper above must be able to fail, else the interop tests prove nothing."""
    model = hf_llama(tiny_model_dir)
    lora.inject(model, r=2, alpha=4)
    lora.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(str(path))
    sd.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    save_file(sd, str(path), metadata={"format": "pt"})
    with pytest.raises(AssertionError, match="missing adapter keys"):
        peft_load_strict(tiny_model_dir, tmp_path)
    sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] = torch.zeros(32, 2)
    sd["base_model.model.model.layers.0.self_attn.v_proj.lora_C.weight"] = torch.zeros(2, 2)
    save_file(sd, str(path), metadata={"format": "pt"})
    with pytest.raises(AssertionError, match="unexpected keys"):
        peft_load_strict(tiny_model_dir, tmp_path)


# --- strict loading on a toy model (fast): every mismatch is a clear error, never a no-op ---

def _saved_toy(tmp_path: Path, **inject_kwargs) -> Path:
    model = make_toy()
    lora.inject(model, **({"targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8} | inject_kwargs))
    randomize_lora(model)
    out = tmp_path / "adapter"
    lora.save_adapter(model, out, task_type=None)
    return out


def _rewrite(adapter: Path, edit_weights=None, edit_config=None) -> None:
    if edit_weights is not None:
        path = adapter / "adapter_model.safetensors"
        sd = load_file(str(path))
        edit_weights(sd)
        save_file(sd, str(path), metadata={"format": "pt"})
    if edit_config is not None:
        path = adapter / "adapter_config.json"
        cfg = json.loads(path.read_text())
        edit_config(cfg)
        path.write_text(json.dumps(cfg))


def test_toy_roundtrip_is_exact(tmp_path):
    adapter = _saved_toy(tmp_path, use_rslora=True)
    src = make_toy()
    lora.inject(src, targets=["q_proj", "v_proj"], r=4, alpha=8, use_rslora=True)
    randomize_lora(src)
    dst = lora.load_adapter(make_toy(), adapter)
    x = torch.randn(3, 2, 8)
    assert torch.equal(src.eval()(x), dst.eval()(x))
    assert set(lora.adapter_state_dict(dst)) == set(load_file(str(adapter / "adapter_model.safetensors")))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    # Loading again into the model that now has LoRA (same config) is fine too.
    lora.load_adapter(dst, adapter)


def test_saved_targets_are_exact_when_suffixes_are_not(tmp_path):
    model = make_toy()
    lora.inject(model, targets=["layers.0.q_proj", "up"], r=2, alpha=2)
    cfg = lora.adapter_config(model)
    assert cfg["target_modules"] == ["layers.0.q_proj", "layers.0.up", "layers.1.up"]
    lora.save_adapter(model, tmp_path)
    assert set(lora.lora_modules(lora.load_adapter(make_toy(), tmp_path))) == set(cfg["target_modules"])


@pytest.mark.parametrize("case, msg", [
    ("missing", r"missing 1 keys \(base_model\.model\.layers\.1\.v_proj\.lora_A\.weight\)"),
    ("unexpected", r"unexpected 1 keys \(base_model\.model\.layers\.0\.up\.lora_A\.weight\)"),
    ("shape", r"lora_B\.weight has shape \[16, 3\] but the model expects \[16, 4\]"),
    ("peft_type", "peft_type='IA3'.*only LoRA"),
    ("dora", "use_dora=True"),
    ("modules_to_save", "modules_to_save"),
    ("pissa", "init_lora_weights='pissa'"),
    ("no_target", r"\['w_proj'\] match no linear layer"),
])
def test_bad_adapters_raise_and_leave_model_untouched(tmp_path, case, msg):
    adapter = _saved_toy(tmp_path)
    key_a = "base_model.model.layers.1.v_proj.lora_A.weight"
    edits = {
        "missing": dict(edit_weights=lambda sd: sd.pop(key_a)),
        "unexpected": dict(edit_weights=lambda sd: sd.update(
            {"base_model.model.layers.0.up.lora_A.weight": torch.zeros(4, 16)})),
        "shape": dict(edit_weights=lambda sd: sd.update(
            {"base_model.model.layers.0.q_proj.lora_B.weight": torch.zeros(16, 3)})),
        "peft_type": dict(edit_config=lambda c: c.update(peft_type="IA3")),
        "dora": dict(edit_config=lambda c: c.update(use_dora=True)),
        "modules_to_save": dict(edit_config=lambda c: c.update(modules_to_save=["lm_head"])),
        "pissa": dict(edit_config=lambda c: c.update(init_lora_weights="pissa")),
        "no_target": dict(edit_config=lambda c: c.update(target_modules=["q_proj", "w_proj"])),
    }
    _rewrite(adapter, **edits[case])
    model = make_toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAError, match=msg):
        lora.load_adapter(model, adapter)
    assert not lora.lora_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rank_and_target_mismatch_with_existing_lora(tmp_path):
    adapter = _saved_toy(tmp_path)  # r=4 on q_proj, v_proj
    other_rank = make_toy()
    lora.inject(other_rank, targets=["q_proj", "v_proj"], r=8, alpha=8)
    with pytest.raises(LoRAError, match="r=4.*r=8"):
        lora.load_adapter(other_rank, adapter)
    other_targets = make_toy()
    lora.inject(other_targets, targets=["q_proj"], r=4, alpha=8)
    with pytest.raises(LoRAError, match=r"unexpected 4 keys \(base_model\.model\.layers\.0\.v_proj"):
        lora.load_adapter(other_targets, adapter)
    merged = make_toy()
    lora.inject(merged, targets=["q_proj", "v_proj"], r=4, alpha=8)
    lora.merge(merged)
    with pytest.raises(LoRAError, match="unmerge"):
        lora.load_adapter(merged, adapter)


def test_missing_files_raise(tmp_path):
    with pytest.raises(LoRAError, match="no adapter_config.json"):
        lora.load_adapter(make_toy(), tmp_path)
    adapter = _saved_toy(tmp_path)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(LoRAError, match="pickle"):
        lora.load_adapter(make_toy(), adapter)
    with pytest.raises(LoRAError, match="no LoRA modules"):
        lora.save_adapter(make_toy(), tmp_path / "x")
