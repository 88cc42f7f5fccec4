"""Datasets: readers for the benchmarks and users' folders, TFDS builders, grain pipelines,
and the synthetic dataset. See `readers.read`, `pipeline.train_dataset` / `eval_dataset`."""
