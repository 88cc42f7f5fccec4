"""Model code, pure: the towers (`dinov3`, `clip_text` with `tokenizer` and `prompts`), the
AD-DINOv3 head (`model`: adapters, AACM, maps), `losses`, the few-shot nearest-neighbour math
(`fewshot`) and the logical-axis names every layer uses (`sharding`). No files, no mesh set-up,
no command line: the I/O layer (`addinov3_jax.io`) loads weights into these modules."""
