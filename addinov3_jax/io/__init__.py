"""The I/O layer, above the models: tensors on disk (`checkpoint_io`), the towers from any supported
source (`towers`, which calls the top-level `weight_conversion` package) and model directories
(`model_dir`: save / load)."""
