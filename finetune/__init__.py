"""finetune: the training loop, the evaluator and what they share (config, data, checkpoints, metrics).

It composes the three standalone packages (llama, quant, lora) into what ``train.py`` and ``eval.py``
run; the map of its modules is in docs/DESIGN.md.
"""
