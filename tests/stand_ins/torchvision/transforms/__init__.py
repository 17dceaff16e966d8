"""The stand-in's ``torchvision.transforms``: only ``functional``."""
