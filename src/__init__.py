"""A RunPod serverless worker for Stable Diffusion 1.5."""

__version__ = "0.1.0"
