"""quant package (being built)."""
