"""finetune package (being built)."""
