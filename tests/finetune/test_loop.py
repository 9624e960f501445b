"""The training loop's maths and behaviour on the tiny fixture Llama (CPU, fp32).

Oracle: the plain full-logits mean cross-entropy (``F.cross_entropy(..., ignore_index=-100)``) of the
whole padded batch, for the training loss, the LoRA gradients and the eval loss; lora.load_adapter
(strict) for the saved adapters.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from train_testlib import metrics, run_config, train_losses, write_csv  # noqa: E402

import llama  # noqa: E402
import lora  # noqa: E402
from finetune.config import config_from_dict, load_config  # noqa: E402
from finetune.data.examples import IGNORE_INDEX, Example, collate  # noqa: E402
from finetune.data.plan import make_plan  # noqa: E402
from finetune.run import checkpoint as ckpt  # noqa: E402
from finetune.run.loop import TrainingDiverged, train  # noqa: E402
from finetune.run.loss import LossSetup, chunked_ce_sum, eval_loss, window_backward  # noqa: E402
from finetune.run.optim import lr_factor  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def lora_model(model_dir: Path, targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> torch.nn.Module:
    """The tiny Llama with LoRA whose B is random (B = 0 would give A no gradient), no dropout."""
    torch.manual_seed(0)
    model = llama.from_pretrained(model_dir)
    lora.inject(model, targets=list(targets), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.2)
    return model.train()


def ragged_examples(vocab: int = 512) -> list[Example]:
    """Three sequences of different lengths, each with a masked prompt and several target tokens."""
    g = torch.Generator().manual_seed(1)
    out = []
    for length, prompt in ((7, 3), (15, 4), (24, 13)):
        ids = [1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append(Example(ids, labels, prompt_len=prompt))
    return out


def reference_loss(model: torch.nn.Module, examples: list[Example]) -> torch.Tensor:
    """Mean next-token CE over every target token of the padded batch, from full logits."""
    b = collate(examples, pad_id=0)
    logits = model(b["input_ids"], attention_mask=b["attention_mask"])
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    assert err <= rel, err


def with_reference(model_dir: Path
                   ) -> tuple[torch.nn.Module, list[Example], torch.Tensor, dict[str, torch.Tensor]]:
    """The LoRA model, the ragged examples, and the oracle: full-logits loss and its LoRA gradients."""
    model = lora_model(model_dir)
    examples = ragged_examples()
    ref = reference_loss(model, examples)
    ref.backward()
    return model, examples, ref, lora_grads(model)


def test_chunked_ce_equals_full_logits_loss_and_grads(tiny_model_dir):
    model, examples, ref, ref_grads = with_reference(tiny_model_dir)
    assert all(g.abs().sum() > 0 for g in ref_grads.values())
    b = collate(examples, pad_id=0)
    for chunk in (1, 5, 1024):
        model.zero_grad(set_to_none=True)
        hidden = model(b["input_ids"], attention_mask=b["attention_mask"], hidden_only=True)
        total, n = chunked_ce_sum(model.lm_head, hidden, b["labels"], chunk_size=chunk)
        assert n == int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        (total / n).backward()
        assert_rel_close(total.detach() / n, ref.detach())
        for name, g in lora_grads(model).items():
            assert_rel_close(g, ref_grads[name])


def test_accumulation_k_micro_batches_equal_one_batch(tiny_model_dir):
    """k micro-batches of 1 with accumulation k == one batch of k == the full-logits mean CE."""
    model, examples, ref, ref_grads = with_reference(tiny_model_dir)
    results = {}
    for name, groups in {"3x1": [[0], [1], [2]], "1x3": [[0, 1, 2]], "2+1": [[2, 0], [1]]}.items():
        model.zero_grad(set_to_none=True)
        batches = [collate([examples[i] for i in g], pad_id=0) for g in groups]
        ws = window_backward(model, model.lm_head, batches,
                             setup=LossSetup(ce_chunk_size=4, device=torch.device("cpu")))
        results[name] = ws
        assert ws.target_tokens == sum(len(e.input_ids) - e.prompt_len for e in examples)
        assert_rel_close(ws.loss_sum / ws.target_tokens, ref.detach())
        for pname, g in lora_grads(model).items():
            assert_rel_close(g, ref_grads[pname])
    # the test can fail: averaging per-micro-batch means (the naive normalisation) is visibly different
    means = []
    for e in examples:
        b = collate([e], pad_id=0)
        hidden = model(b["input_ids"], attention_mask=b["attention_mask"], hidden_only=True)
        total, n = chunked_ce_sum(model.lm_head, hidden, b["labels"], chunk_size=1024)
        means.append(total.item() / n)
    assert abs(sum(means) / 3 - ref.item()) > 1e-3


def test_gradient_checkpointing_gives_the_same_grads(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    batches = [collate(ragged_examples(), pad_id=0)]
    window_backward(model, model.lm_head, batches,
                    setup=LossSetup(ce_chunk_size=8, device=torch.device("cpu")))
    plain = lora_grads(model)
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing = True
    window_backward(model, model.lm_head, batches,
                    setup=LossSetup(ce_chunk_size=8, device=torch.device("cpu")))
    for name, g in lora_grads(model).items():  # every LoRA parameter still gets its gradient
        assert g.abs().sum() > 0
        assert_rel_close(g, plain[name])


def test_full_vocab_logits_are_never_stored(tiny_model_dir):
    """Autograd keeps no [N, vocab] logits beyond one chunk: the head runs inside checkpoints."""
    model = lora_model(tiny_model_dir)
    b = collate(ragged_examples(), pad_id=0)
    vocab, chunk = model.config.vocab_size, 4
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model(b["input_ids"], attention_mask=b["attention_mask"], hidden_only=True)
        total, n = chunked_ce_sum(model.lm_head, hidden, b["labels"], chunk_size=chunk)
    assert n > chunk and saved
    assert not [s for s in saved if s and s[-1] == vocab], saved  # no logits saved at all
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the oracle does save them
        logits = model(b["input_ids"], attention_mask=b["attention_mask"])
        F.cross_entropy(logits.flatten(0, 1), b["input_ids"].flatten())
    assert [s for s in saved if s and s[-1] == vocab]
    total.backward()


def test_lr_schedule_shapes():
    total, warm = 20, 4
    for kind in ("cosine", "linear", "constant"):
        f = [lr_factor(s, total, warmup_steps=warm, kind=kind) for s in range(total)]
        assert f[:warm] == sorted(f[:warm]) and 0 < f[0] < f[warm - 1] < 1  # warmup never starts at 0
        assert f[warm] == 1.0
        assert all(0 < x <= 1 for x in f)
        if kind == "constant":
            assert set(f[warm:]) == {1.0}
        else:
            assert f[warm:] == sorted(f[warm:], reverse=True) and f[-1] < 0.1
    mid = warm + (total - warm) // 2
    assert math.isclose(lr_factor(mid, total, warmup_steps=warm, kind="cosine"), 0.5, abs_tol=1e-12)
    assert math.isclose(lr_factor(mid, total, warmup_steps=warm, kind="linear"), 0.5, abs_tol=1e-12)


def test_data_plan_shards_like_a_bigger_accumulation(tiny_model_dir, tmp_path):
    """2 ranks x accumulation 2 use exactly the examples 1 rank x accumulation 4 uses, step by step;
    the order depends on (seed, epoch) only."""
    cfg = config_from_dict(run_config(tiny_model_dir, tmp_path / "d.csv", tmp_path / "run",
                                      train={"micro_batch_size": 1, "gradient_accumulation_steps": 2,
                                             "max_steps": 7}), check_paths=False)
    two = make_plan(cfg.train, 10, world=2)
    cfg.train.gradient_accumulation_steps = 4
    one = make_plan(cfg.train, 10, world=1)
    assert two.steps_per_epoch == one.steps_per_epoch == 2  # 10 // 4, incomplete batches dropped
    for step in range(7):
        union = sorted(i for r in range(2) for mb in two.window(step, r) for i in mb)
        assert union == sorted(i for mb in one.window(step) for i in mb)
        assert len(set(union)) == 4
    fresh = make_plan(cfg.train, 10, world=1)
    assert [fresh.window(s) for s in (5, 0, 3)] == [one.window(s) for s in (5, 0, 3)]
    assert one.epoch_order(0) != one.epoch_order(1)


def test_eval_loss_is_the_token_weighted_mean_over_the_split(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    examples = ragged_examples()
    with torch.no_grad():
        ref = reference_loss(model.eval(), examples).item()
        first_two = reference_loss(model, examples[:2]).item()
    model.train()
    ours, n = eval_loss(model, examples, pad_id=0, batch_size=2,
                         setup=LossSetup(ce_chunk_size=3, device=torch.device("cpu")))
    assert n == sum(len(e.input_ids) - e.prompt_len for e in examples)
    assert math.isclose(ours, ref, rel_tol=1e-5)
    capped, _ = eval_loss(model, examples, pad_id=0, batch_size=1,
                          setup=LossSetup(ce_chunk_size=1024, device=torch.device("cpu")), max_batches=2)
    assert math.isclose(capped, first_two, rel_tol=1e-5)
    assert model.training  # restored


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_loss_halves_within_a_few_dozen_steps(tiny_model_dir, tmp_path, mode, one_thread):
    data = write_csv(tmp_path / "data.csv")
    # The fixture's head is random with std 0.02 and frozen under LoRA: it caps how peaked the output
    # can get, so the LoRA run also adapts lm_head (a supported target).
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    lo = {"targets": targets, "r": 8, "alpha": 16, "dropout": 0.0} if mode == "lora" else {"enabled": False}
    cfg = config_from_dict(run_config(tiny_model_dir, data, tmp_path / "run", lora=lo, train={
        "max_steps": 30, "lr": 1e-2 if mode == "lora" else 3e-3, "scheduler": "constant", "warmup_steps": 0,
        "eval_steps": 10, "save_steps": 10, "save_total_limit": 1}))
    result = train(cfg, progress=False)
    losses = [loss for _, loss in train_losses(tmp_path / "run")]
    assert len(losses) == 30 and result.step == 30
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    evals = [r["eval_loss"] for r in metrics(tmp_path / "run") if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    final = tmp_path / "run" / "final"
    if mode == "full":  # final/ is a loadable HF model directory
        trained = llama.from_pretrained(final)
        assert not torch.equal(trained.lm_head.weight, llama.from_pretrained(tiny_model_dir).lm_head.weight)
        assert (final / "tokenizer.model").is_file()


def test_run_outputs(tiny_model_dir, tmp_path, one_thread):
    """config.yaml reloads, metrics.jsonl has every field, the plot is a PNG, final/ = last checkpoint,
    and the adapter loads strictly; the logged eval loss is the evaluator's loss of that adapter."""
    from finetune.data.examples import prepare

    data = write_csv(tmp_path / "data.csv")
    cfg = config_from_dict(run_config(tiny_model_dir, data, tmp_path / "run",
                                      train={"logging_steps": 2, "save_total_limit": 1}))
    train(cfg, progress=False)
    run = tmp_path / "run"
    assert load_config(run / "config.yaml").to_dict() == cfg.to_dict()
    logs = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4, 6]
    for r in logs:
        assert set(r) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes", "elapsed"}
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0 and r["grad_norm"] > 0
    assert (run / "plots" / "loss.png").read_bytes()[:8] == PNG_MAGIC
    # save_total_limit 1 keeps the newest and the best by eval loss
    kept = [c.step for c in ckpt.list_checkpoints(run)]
    assert 6 in kept and len(kept) <= 2
    last = ckpt.latest_checkpoint(run)
    assert last.step == 6 and json.loads((last.path / "checkpoint.json").read_text())["eval_loss"] is not None
    base = llama.from_pretrained
    final_sd = lora.adapter_state_dict(lora.load_adapter(base(tiny_model_dir), run / "final"))
    last_sd = lora.adapter_state_dict(lora.load_adapter(base(tiny_model_dir), last.path))
    assert final_sd.keys() == last_sd.keys() and all(torch.equal(final_sd[k], last_sd[k]) for k in final_sd)
    model = lora.load_adapter(llama.from_pretrained(tiny_model_dir), run / "final").eval()
    test = prepare(cfg.data, llama.Tokenizer.from_pretrained(tiny_model_dir)).test
    with torch.no_grad():
        ref = reference_loss(model, test).item()
    logged = [r["eval_loss"] for r in metrics(run) if "eval_loss" in r][-1]
    assert math.isclose(logged, ref, rel_tol=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    """lr 1e30: step 1 is finite but blows the weights up, step 2's loss is NaN."""
    data = write_csv(tmp_path / "data.csv")
    cfg = config_from_dict(run_config(tiny_model_dir, data, tmp_path / "run", train={
        "lr": 1e30, "scheduler": "constant", "warmup_steps": 0, "save_steps": 1, "max_grad_norm": None}))
    with pytest.raises(TrainingDiverged, match=r"at step 2: loss nan.*last good checkpoint: .*step-1"):
        train(cfg, progress=False)
    run = tmp_path / "run"
    assert [c.step for c in ckpt.list_checkpoints(run)] == [1]
    assert ckpt.latest_checkpoint(run).step == 1
    assert not (run / "final").exists()
    assert [s for s, _ in train_losses(run)] == [1]



def test_qlora_on_cpu_streams_4bit_and_prequantized_is_identical(tiny_model_dir, tmp_path, one_thread):
    """The real 4-bit path (bitsandbytes NF4 on CPU, gradient checkpointing): trains, saves an adapter
    that loads onto a 4-bit base; a pre-quantised copy of the base gives the very same run."""
    quant = pytest.importorskip("quant")
    data = write_csv(tmp_path / "data.csv")
    base = run_config(tiny_model_dir, data, tmp_path / "run", quant={"enabled": True},
                      model={"gradient_checkpointing": True}, train={"max_steps": 3, "save_steps": 3})
    train(config_from_dict(base), progress=False)
    streamed = train_losses(tmp_path / "run")
    assert len(streamed) == 3 and all(math.isfinite(x) for _, x in streamed)
    model = llama.from_pretrained(tiny_model_dir, linear_hook=quant.make_hook(
        quant.QuantConfig(compute_dtype=torch.float32)))
    assert isinstance(model.model.layers[0].self_attn.q_proj, quant.Linear4bit)
    lora.load_adapter(model, tmp_path / "run" / "final")
    # the same run from a pre-quantised base (model.prequantized) is bit-identical
    quant.save_quantized(llama.from_pretrained(tiny_model_dir, linear_hook=quant.make_hook(
        quant.QuantConfig(compute_dtype=torch.float32))), tmp_path / "nf4", quant.QuantConfig(
        compute_dtype=torch.float32))
    base["model"]["prequantized"] = str(tmp_path / "nf4")
    base["train"]["output_dir"] = str(tmp_path / "pre")
    train(config_from_dict(base), progress=False)
    assert train_losses(tmp_path / "pre") == streamed
    # and 4-bit is close to, but not the same as, the fp32 base
    base["quant"]["enabled"], base["model"]["prequantized"] = False, None
    base["train"]["output_dir"] = str(tmp_path / "fp32")
    train(config_from_dict(base), progress=False)
    dense = train_losses(tmp_path / "fp32")
    assert dense[0][1] != streamed[0][1] and abs(dense[0][1] - streamed[0][1]) < 0.05


def test_unpadded_batches_run_without_a_mask_and_give_the_same_loss(tiny_model_dir):
    """device_mask drops an all-ones mask (so SDPA may use flash/GQA kernels); the loss is unchanged."""
    import llama
    from finetune.run.loss import chunked_ce_sum, device_mask

    full = torch.ones(2, 6, dtype=torch.long)
    padded = full.clone()
    padded[1, 4:] = 0
    assert device_mask(full, torch.device("cpu")) is None
    assert torch.equal(device_mask(padded, torch.device("cpu")), padded)
    model = llama.from_pretrained(tiny_model_dir)
    ids = torch.randint(3, 500, (2, 6))
    labels = ids.clone()
    with torch.no_grad():
        a, _ = chunked_ce_sum(model.lm_head, model(ids, attention_mask=full, hidden_only=True), labels,
                              chunk_size=4)
        b, _ = chunked_ce_sum(model.lm_head, model(ids, attention_mask=None, hidden_only=True), labels,
                              chunk_size=4)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
