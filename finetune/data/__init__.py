"""finetune.data: from a data file to the token ids of each training or evaluation example.

rows.py (read CSV/JSONL/JSON rows, split, encode, collate), templates.py (every prompt template),
plan.py (which examples each optimizer step sees, in which order).
"""
