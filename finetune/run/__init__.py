"""finetune.run: one training run, from the resolved config to the final adapter.

loop.py (the loop), loss.py (token-weighted chunked cross-entropy), optim.py (optimizer, schedule,
precision), checkpoint.py (save, verify, resume), lock.py (one process per run folder).
"""
