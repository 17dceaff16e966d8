"""Stage 2 of a job, under the GPU lock: ``Engine.run`` takes a ``JobPlan`` and returns its pictures.

``engine`` keeps the guard rails (admission, the lock, the deadline, adapters on and off, prompt encoding,
the OOM retry); ``pipelines`` makes the pipeline calls (the passes, the VAE decode with its NaN guard,
the safety checker); ``job`` is one job's deadline and progress; ``memory`` sizes admission;
``startup`` loads the model and its adapters once; ``gpu`` checks the card at start.

Only this stage holds GPU state. It may import every stage before it, never ``finish``.
"""
