"""Where the weights come from, and the pipeline built from them.

Owns the SD 1.5 pipeline's loading (``loader``: device, dtype, a baked or local folder,
the hub, a single file, a VAE), single-file checkpoints checked from their header and
converted offline (``checkpoints``, ``safetensors_header``), and A1111's sampler names
as fresh diffusers schedulers (``schedulers``). Nothing per request but the scheduler.

May import ``src.errors``, ``src.settings``, ``src.storage`` and ``src.schema``; nothing
later (prompts, adapters, prepare, run, finish).
"""
