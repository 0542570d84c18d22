"""Compression: sensitivity, the budget allocator, pruning, quantization, low rank and distillation."""
