"""What the five top-level files call but a first read can skip: the shapes world (shapes.py),
augmentation (augment.py), the exact fast FDT kernels (fdt_fast.py), outside evaluation sets
(benchmarks.py), the numbers made from embeddings (metrics.py) and every figure (figures.py)."""
