"""Streaming long-video question answering on Qwen2-VL with a pruned key/value memory."""

__version__ = "0.1.0"
