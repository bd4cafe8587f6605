"""The engine: scheduler -> step plan -> model runner -> sampler -> postprocess (DESIGN §2)."""
