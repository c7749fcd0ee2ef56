"""Kernels and weight layouts the interpreter runs: Metal sources and portable fallbacks."""
