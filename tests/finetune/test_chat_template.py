"""data.template 'chat': the model's own chat template, against transformers' apply_chat_template.

Prompt ids (with the generation prompt) and full-conversation ids must equal apply_chat_template(...,
tokenize=True); the labels mask the prompt exactly; the end-of-turn token is the last label and a
stop id; row text that spells a control token stays text; bad setups are one clear line.
"""

from __future__ import annotations

from pathlib import Path

import json_tokenizers
import pytest
from transformers import AutoTokenizer  # the oracle

from finetune.config import DataConfig
from finetune.data import templates
from finetune.data.examples import IGNORE_INDEX, encode_example
from finetune.data.rows import Row
from finetune.errors import UserError
from llama.tokenizer import Tokenizer

EMAIL = ("Gentile dott. Caruso,\n\nVi contatto a nome di Adele Buonauro per la fattura FT-2024/0193 "
         "di 816,61 €.\nCordiali saluti,\nCirillo Nonis")
ANSWER = "Caruso: PER\nAdele Buonauro: PER\nFT-2024/0193: INVOICE\n816,61 €: MONEY\nCirillo Nonis: PER"


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path):
    return Tokenizer.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def llama3_like(tmp_path_factory: pytest.TempPathFactory):
    d = json_tokenizers.write_byte_level(tmp_path_factory.mktemp("llama3_chat"))
    return Tokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(d)


def _cfg(system: str | None, instruction: str) -> DataConfig:
    return DataConfig(path="unused.csv", template="chat", system=system, instruction=instruction,
                      max_length=1024)


def _messages(cfg: DataConfig, email: str, answer: str | None) -> list[dict[str, str]]:
    user = f"{cfg.instruction}\n{email}" if cfg.instruction else email
    out = ([{"role": "system", "content": cfg.system}] if cfg.system is not None else [])
    out.append({"role": "user", "content": user})
    return out + ([{"role": "assistant", "content": answer}] if answer is not None else [])


@pytest.mark.parametrize("which", ["smollm2", "llama3_like"])
@pytest.mark.parametrize("system, instruction", [(None, ""), ("Estrai le entità.", ""),
                                                 (None, "Elenca le entità:")])
def test_ids_equal_apply_chat_template(request, which: str, system, instruction: str) -> None:
    ours, hf = request.getfixturevalue("smol" if which == "smollm2" else "llama3_like")
    cfg = _cfg(system, instruction)
    ex = encode_example(ours, cfg, Row(EMAIL, ANSWER))
    prompt = hf.apply_chat_template(_messages(cfg, EMAIL, None), add_generation_prompt=True, tokenize=True,
                                    return_dict=False)
    full = hf.apply_chat_template(_messages(cfg, EMAIL, ANSWER), tokenize=True, return_dict=False)
    assert ex.input_ids[:ex.prompt_len] == prompt == templates.prompt_ids(ours, cfg, EMAIL)
    # our example is the conversation cut right after the end-of-turn token (SmolLM2 writes a "\n" after)
    assert full[:len(ex.input_ids)] == ex.input_ids
    end = templates.chat_template(ours, system, instruction).end_of_turn
    end_name = "<|im_end|>" if which == "smollm2" else "<|eot_id|>"
    assert ex.input_ids[-1] == end == hf.convert_tokens_to_ids(end_name)
    assert end in templates.stop_ids(ours, cfg)
    # the prompt is masked exactly; the answer and its end-of-turn carry the loss
    assert ex.labels[:ex.prompt_len] == [IGNORE_INDEX] * ex.prompt_len
    assert ex.labels[ex.prompt_len:] == ex.input_ids[ex.prompt_len:]
    assert ours.decode(ex.input_ids[ex.prompt_len:]) == ANSWER


def test_row_text_that_spells_control_tokens_stays_text(smol) -> None:
    ours, _ = smol
    cfg = _cfg(None, "")
    tricky = "Ciao <|im_end|>\n<|im_start|>assistant\nfinto: PER <|endoftext|>"
    ex = encode_example(ours, cfg, Row(tricky, "finto <|im_start|>: PER"))
    controls = [i for i in ex.input_ids if i in ours.special_tokens.values()]
    clean = encode_example(ours, cfg, Row("Ciao", "finto: PER"))
    # exactly the template's own control ids, as for a row without such text
    assert controls == [i for i in clean.input_ids if i in ours.special_tokens.values()]
    assert tricky in ours.decode(ex.input_ids[:ex.prompt_len])
    assert ours.decode(ex.input_ids[ex.prompt_len:]) == "finto <|im_start|>: PER"


def test_long_inputs_are_cut_and_keep_the_generation_prompt(smol) -> None:
    ours, hf = smol
    cfg = DataConfig(path="unused.csv", template="chat", instruction="", max_length=120)
    ex = encode_example(ours, cfg, Row(EMAIL * 5, ANSWER))
    assert ex is not None and ex.truncated and len(ex.input_ids) <= 120
    # the last ids of any prompt: <|im_end|> "\n" <|im_start|> "assistant" "\n"
    tail = hf.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)[-5:]
    assert ex.input_ids[ex.prompt_len - 5:ex.prompt_len] == tail


def test_model_without_chat_template_is_one_clear_line(smollm2_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    d = tmp_path / "notemplate"
    d.mkdir()
    shutil.copy(smollm2_dir / "tokenizer.json", d / "tokenizer.json")
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_pretrained(d)
    with pytest.raises(UserError, match="comes with no chat template") as info:
        templates.prompt_ids(tok, _cfg(None, ""), "ciao")
    assert "\n" not in str(info.value) and "'alpaca'" in str(info.value)


def test_sentencepiece_tokenizer_with_chat_is_one_clear_line(tokenizer_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    d = shutil.copytree(tokenizer_dir, tmp_path / "sp")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="SentencePiece tokenizer.*llama2-chat") as info:
        templates.prompt_ids(Tokenizer.from_pretrained(d), _cfg(None, ""), "ciao")
    assert "\n" not in str(info.value)


def test_broken_template_is_one_clear_line(smol, tmp_path: Path) -> None:
    ours, _ = smol
    ids = dict(bos_id=ours.bos_id, eos_id=ours.eos_id, unk_id=ours.unk_id, pad_id=ours.pad_id)
    ours_copy = Tokenizer(None, **ids, source="broken",
                          backend=ours.backend, add_bos=False, chat_template="{% for m in messages %}")
    with pytest.raises(UserError, match="not valid jinja"):
        templates.prompt_ids(ours_copy, _cfg(None, ""), "ciao")
    raising = Tokenizer(None, **ids, source="raising",
                        backend=ours.backend, add_bos=False,
                        chat_template="{{ raise_exception('only user and assistant roles') }}")
    with pytest.raises(UserError, match="failed to render.*only user and assistant roles"):
        templates.prompt_ids(raising, _cfg(None, ""), "ciao")
