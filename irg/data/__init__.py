"""IRGL data: the row format, training samples and packing, synthetic data, the Ray Data pipeline."""
