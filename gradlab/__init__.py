"""gradlab: paired experiments on gradient accumulation in PyTorch."""

__version__ = "0.1.0"
