"""Build-time tools: model caching, GPU self-check and the tiny offline model."""
