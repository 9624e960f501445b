"""The real runtime: llama.cpp itself (through llama-cpp-python) runs our f16 GGUF of a fine-tuned SmolLM2.

llama-cpp-python is on PyPI as source only, so it compiles llama.cpp with CMake (about 10 minutes on
this project's 2-core machines, CMAKE_BUILD_PARALLEL_LEVEL=1). Where it is not installed the test is
skipped with that reason. Checked: llama.cpp's tokenizer gives our prompt ids (chat template rendered,
control tokens parsed), and its greedy tokens on 4 prompts equal ours (our merged fp32 model).
"""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from export_testlib import REPO, SMOLLM2, save_adapter

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not installed (pip install llama-cpp-python: it builds "
                              "llama.cpp from source with CMake)"),
    pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").is_file(),
                       reason="models/SmolLM2-135M-Instruct is absent (scripts/fetch_smollm2.py)"),
]

PROMPTS = ["Gentile Mario Rossi, la consegna per Acme S.p.A. a Milano è confermata per il 12/03.",
           "Buongiorno, perché la fattura 4521 di Banca Intesa non è ancora stata pagata?",
           "Ciao Giulia! Ci vediamo lunedì a Torino? Porta i documenti di Poste Italiane.",
           "Scrivete a luca.ferrari@example.it oppure chiamate il +39 02 5550123."]
NEW_TOKENS = 16


def test_llama_cpp_greedy_tokens_equal_ours(tmp_path):
    import llama_cpp

    import llama
    from finetune.config import load_config
    from finetune.data import templates
    from finetune.evaluate.dense import densify
    from finetune.evaluate.evaluator import load_for_eval
    from finetune.export.runner import run_export

    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    demo["model"].update(path=str(SMOLLM2), device="cpu")
    demo["data"]["path"] = str(REPO / "data" / "emails.csv")
    demo["train"]["output_dir"] = str(tmp_path / "run")
    cfg_path = tmp_path / "demo.yaml"
    cfg_path.write_text(yaml.safe_dump(demo, allow_unicode=True), encoding="utf-8")
    cfg = load_config(cfg_path)
    every_linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapter = save_adapter(SMOLLM2, tmp_path / "adapter", scale=0.02, targets=every_linear)
    gguf_path = run_export(cfg, "gguf", str(tmp_path / "out" / "smollm2-f16.gguf"), adapter=str(adapter),
                           gguf_type="f16", progress=False, log=lambda s: None)

    tok = llama.Tokenizer.from_pretrained(SMOLLM2)
    ours = densify(load_for_eval(cfg, str(SMOLLM2), adapter))
    prompt_ids = [templates.prompt_ids(tok, cfg.data, p) for p in PROMPTS]
    stops = templates.stop_ids(tok, cfg.data)
    expected = llama.generate_ids(ours, prompt_ids, max_new_tokens=NEW_TOKENS, eos_id=stops,
                                  pad_id=tok.pad_id)

    cpp = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=512, n_threads=2, n_batch=512, verbose=False,
                          seed=0)
    ct = templates.chat_template(tok, cfg.data.system, cfg.data.instruction)
    for text, ids, want in zip(PROMPTS, prompt_ids, expected):
        rendered = ct._render(ct._messages(text, None), add_generation_prompt=True)
        assert cpp.tokenize(rendered.encode("utf-8"), add_bos=False, special=True) == ids
        got = []
        cpp.reset()
        for t in cpp.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if t in stops or len(got) == NEW_TOKENS:
                break
            got.append(t)
        print(f"\n{text[:40]!r}: ours {tok.decode(want)!r} | llama.cpp {tok.decode(got)!r}")
        assert got == want, (tok.decode(got), tok.decode(want))


@pytest.mark.parametrize("family", ["llama-spm", "llama3-bpe", "mistral", "qwen2", "llama3-rope"])
def test_llama_cpp_logits_equal_ours_per_family(tmp_path, family):
    """llama.cpp's own forward on our f32 GGUF of each family (Llama-3.1 rope scaling: the rope_freqs
    tensor, which transformers' GGUF reader does not use, so only llama.cpp can check it)."""
    import llama_cpp
    import numpy as np
    import torch
    from export_testlib import make_model, write_config

    import llama
    from finetune.config import load_config
    from finetune.evaluate.dense import densify
    from finetune.evaluate.evaluator import load_for_eval
    from finetune.export.runner import run_export

    if family == "llama3-rope":
        import hf_fixtures

        # the scaling changes these logits by 4e-3, 30x the f32 difference measured below
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}
        model_dir = hf_fixtures.make_hf_checkpoint(tmp_path / family, tokenizer=True, rope_scaling=scaling,
                                                   rope_theta=500000.0)
    else:
        model_dir = make_model(tmp_path, family)
    adapter = save_adapter(model_dir, tmp_path / "adapter")
    cfg = load_config(write_config(tmp_path / "run.yaml", model_dir, tmp_path / "run"))
    path = run_export(cfg, "gguf", str(tmp_path / "out" / "m.gguf"), adapter=str(adapter), gguf_type="f32",
                      progress=False, log=lambda s: None)
    ours = densify(load_for_eval(cfg, str(model_dir), adapter))
    tok = llama.Tokenizer.from_pretrained(model_dir)
    ids = tok.encode("Gentile Mario Rossi, la consegna per Acme S.p.A. a Milano è confermata per il 12/03.")
    with torch.no_grad():
        ref = ours(torch.tensor([ids]))[0].float().numpy()
    cpp = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    cpp.eval(ids)
    got = np.array(cpp.scores[:len(ids)])
    diff = float(np.abs(got - ref).max())
    print(f"\nllama.cpp {family} f32: max abs logit difference {diff:.3g} (max |logit| "
          f"{np.abs(ref).max():.3g})")
    assert diff <= 5e-4 * max(1.0, float(np.abs(ref).max()))
