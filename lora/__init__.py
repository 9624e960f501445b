"""lora package (being built)."""
