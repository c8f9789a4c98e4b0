"""Model optimization: int8 quantization, structured pruning, compiled and exported forms."""
