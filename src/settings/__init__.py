"""Environment -> one validated ``Settings`` object, read once at startup.

Every variable the worker reads is declared in this package, with its default and its
rule. ``load_settings`` is called once per process; nothing else in the worker
reads ``os.environ`` for its own configuration. The package imports nothing of the
worker's own: nothing from ``src`` outside ``src.settings``.

Its modules, one per group of variables, in the order of the README's table:

- ``model``: the checkpoint and VAE, the build's download tokens (``HostToken``), device and dtype;
- ``limits``: a request's largest size, steps and batch, and its defaults;
- ``adapters``: embeddings, LoRAs and ControlNets;
- ``run``: prompt encoding limits, GPU memory, the deadline, safety checker, concurrency, fast mode;
- ``images``: image files in and out;
- ``downloads``: LoRAs and checkpoints by URL: the hosts allowed, the limits, the disk cache;
- ``storage``: the S3 bucket, and the keys it accepts (``s3_key_problem``);
- ``urls``: ``redact_url``, the one place URLs are redacted;
- ``load``: ``Settings``, composed of the groups, its rules across them, and ``load_settings``.

Callers import from ``src.settings`` itself, which re-exports every public name.
"""

from src.settings.load import Settings, SettingsError, load_settings
from src.settings.model import DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION, TOKEN_HOSTS, HostToken
from src.settings.storage import S3_KEY_RULE, s3_key_problem
from src.settings.urls import redact_url

__all__ = [
    "DEFAULT_MODEL_ID",
    "DEFAULT_MODEL_REVISION",
    "S3_KEY_RULE",
    "TOKEN_HOSTS",
    "HostToken",
    "Settings",
    "SettingsError",
    "load_settings",
    "redact_url",
    "s3_key_problem",
]
