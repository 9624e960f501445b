"""finetune.evaluate.compare reads eval.py's metrics.json files and prints the change."""

import json

from finetune.evaluate.compare import compare_table, main
from finetune.evaluate.evaluator import score


def _metrics(golds, preds, inputs, adapter):
    m = score(golds, preds, inputs)
    m["adapter"] = adapter
    return m


def test_compare_shows_the_f1_change(tmp_path, capsys):
    inputs = ["Mario Rossi scrive da Milano."]
    golds = ["Mario Rossi: PER\nMilano: LOC"]
    base = _metrics(golds, ["boh"], inputs, None)
    tuned = _metrics(golds, ["Mario Rossi: PER\nMilano: LOC"], inputs, "runs/x/final")
    table = compare_table([base, tuned], ["base", "fine-tuned"])
    f1_row = next(line for line in table.splitlines() if line.startswith("entity micro F1"))
    assert f1_row.split()[-3:] == ["0.00", "100.00", "+100.00"]
    for name, m in (("a.json", base), ("b.json", tuned)):
        (tmp_path / name).write_text(json.dumps(m))
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "+100.00" in capsys.readouterr().out


def test_compare_missing_file_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope.json"), str(tmp_path / "nope2.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read") and err.count("\n") == 1
