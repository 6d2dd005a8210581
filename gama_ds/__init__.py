"""gama_ds: a DeepSpeed trainer for GAMA-style audio-language models."""

__version__ = "0.1.0"
