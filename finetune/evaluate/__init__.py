"""finetune.evaluate: generate answers for a split and score them.

evaluator.py (the eval flow), metrics.py (entities, ROUGE, BLEU), report.py (metrics.json and
report.md), compare.py (base vs fine-tuned table), dense.py (the merged dense copy for generation).
"""
