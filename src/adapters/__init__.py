"""What a request adds to the shared pipeline by name, and takes off after it.

Owns the folders of add-ons and their state on the pipeline: LoRAs (``loras``: scanned
by header, loaded on first use, on for one job and off after it, cached), ControlNets
(``controlnets``: checked by shape, loaded on first use, one job's units) and
textual-inversion embeddings (``embeddings``: loaded at startup, used by name in prompts).
The methods that change the pipeline run under the engine's GPU lock.

May import ``src.errors``, ``src.settings``, ``src.storage``, ``src.schema``, ``src.models``
and ``src.prompts``; nothing later (prepare, run, finish).
"""
