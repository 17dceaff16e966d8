"""FAST_MODE's compiled kernels kept between workers (src/run/compile_cache.py, COMPILE_CACHE_DIR).

The round trip is real: two processes, each with an empty inductor cache of its own, compile the same module with
torch.compile's inductor on the CPU; the first keeps its artifacts through ``CompileCache.save``, the second loads
them through ``open_cache`` and finds its graph in them instead of compiling it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from src.run.compile_cache import CompileCache, cache_key, open_cache
from src.run.engine import Engine
from src.settings import load_settings
from tests.forked import run_module

SCRIPT = """
import json, sys, torch
from torch._dynamo.utils import counters
from src.run.compile_cache import open_cache

class Net(torch.nn.Module):
    config = {"width": 8}

    def forward(self, x):
        return torch.nn.functional.gelu(x @ x.T) + 1

net = Net()
cache = open_cache(sys.argv[1], net, torch.float32, {"lora_slots": 0})
torch.compile(net, fullgraph=True)(torch.randn(8, 8))
if "more" in sys.argv:  # a graph the file does not hold: compiled, and kept with the others
    torch.compile(torch.nn.Tanh(), fullgraph=True)(torch.randn(8, 8))
cache.save()
found = counters["inductor"]
print(json.dumps({"found": cache.found, "hits": found["fxgraph_cache_hit"], "misses": found["fxgraph_cache_miss"]}))
"""


def compile_once(folder: Path, scratch: Path, *more: str) -> dict[str, object]:
    """One process's compile, with COMPILE_CACHE_DIR ``folder`` and an inductor cache of its own: a process forked
    from tests/forked.py's server, which imported torch and never compiled anything. ``more``: "more" compiles a
    second graph too."""
    scratch.mkdir()
    (scratch / "compile_once.py").write_text(SCRIPT)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor")}
    done = run_module("compile_once", str(folder), *more, cwd=scratch, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_finds_the_first_ones_kernels(tmp_path: Path) -> None:
    folder = tmp_path / "compile-cache"
    first = compile_once(folder, tmp_path / "inductor-1")
    assert first == {"found": False, "hits": 0, "misses": 1}
    [kept] = folder.iterdir()
    assert kept.name.startswith("cpu-sm00-torch")
    # One that compiles a graph the file lacks (the file predates a change its name does not see) keeps it too;
    # one that found everything leaves the file as it was.
    second = compile_once(folder, tmp_path / "inductor-2", "more")
    assert second == {"found": True, "hits": 1, "misses": 1}
    assert list(folder.iterdir()) == [kept]
    written = kept.stat().st_mtime_ns
    third = compile_once(folder, tmp_path / "inductor-3", "more")
    assert third == {"found": True, "hits": 2, "misses": 0}
    assert kept.stat().st_mtime_ns == written


def test_the_file_name_carries_the_gpu_torch_dtype_and_shape() -> None:
    shape = {"unet": {"block_out_channels": [320, 640]}, "lora_slots": 0}
    name = cache_key("NVIDIA H100 80GB HBM3", (9, 0), torch.float16, shape)
    assert name.startswith(f"nvidia-h100-80gb-hbm3-sm90-torch{torch.__version__.replace('+', '-')}-float16-")
    others = {
        cache_key("NVIDIA A100-SXM4-80GB", (8, 0), torch.float16, shape),
        cache_key("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16, shape),
        cache_key("NVIDIA H100 80GB HBM3", (9, 0), torch.float16, {**shape, "lora_slots": 2}),
    }
    assert name not in others
    assert len(others) == 3
    assert name == cache_key("NVIDIA H100 80GB HBM3", (9, 0), torch.float16, dict(reversed(shape.items())))


def test_no_folder_no_cache_and_a_bad_file_costs_a_compile(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Net(torch.nn.Module):
        config: ClassVar[dict[str, int]] = {"width": 8}

    assert open_cache(None, Net(), torch.float32, {}) is None
    cache = open_cache(str(tmp_path), Net(), torch.float32, {})
    assert cache == CompileCache(cache.path if cache else tmp_path)
    assert cache is not None
    cache.path.write_bytes(b"not torch's artifacts")
    again = open_cache(str(tmp_path), Net(), torch.float32, {})
    assert again is not None
    assert not again.found, "it will be written again after the warm-up"
    assert "cannot be loaded" in caplog.text


def test_a_compile_cache_without_fast_mode_is_named_unused(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing a user sets is dropped without a word: COMPILE_CACHE_DIR serves FAST_MODE alone.
    with caplog.at_level(logging.WARNING, logger="src.run.startup"):
        Engine.load(load_settings({"MODEL_ID": str(tiny_model_dir), "COMPILE_CACHE_DIR": str(tmp_path)}))

    assert f"COMPILE_CACHE_DIR={tmp_path} unused: it keeps FAST_MODE's compiled kernels" in caplog.text
