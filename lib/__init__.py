"""What the five top-level files call but a first read can skip: the shapes world (shapes.py),
augmentation (augment.py), the exact fast FDT kernels (fdt_fast.py), outside evaluation sets
(benchmarks.py), the numbers made from embeddings (metrics.py), every figure (figures.py), and the
guard rails: train.py's flags (flags.py), its run folder (run_folder.py) and the data's problems
(data_checks.py)."""
