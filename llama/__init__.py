"""llama package (being built)."""
