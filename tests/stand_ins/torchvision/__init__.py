"""A stand-in for torchvision, for the test suite on a CPU-only machine (see requirements-nodeps.txt).

The package index offers CUDA builds of torchvision only, and they fail at import beside the CPU torch the suite
runs. spandrel imports two torchvision names when it loads, for two architectures the worker does not serve
(LaMa's ``InterpolationMode`` and ``rotate``, RestoreFormer's ``normalize``); the ESRGAN-family paths never call
them. When the real torchvision does not import, tests/conftest.py puts this folder on ``sys.path`` while it
imports spandrel, and takes it off again (no other library sees it), so the real spandrel loads and runs its
ESRGAN-family models in the tests; the Docker image has the real torchvision.
"""

__version__ = "0.0.0+stand-in"
