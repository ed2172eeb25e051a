"""Quantization: INT8 (static, dynamic, QAT), 16-bit floats, mixed precision, k-means."""
