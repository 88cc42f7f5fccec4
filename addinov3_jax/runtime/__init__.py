"""The one run core, above models and I/O: `setup(config)` (validate once, multi-host, mesh,
rules) returning a `Runtime` that owns the sharded towers, the text tables and every jitted step;
the host <-> global helpers and the one inference loop (`inference`); the trainer and the
evaluator that the commands call."""
