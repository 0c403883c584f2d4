"""jpeglm: data pipeline and trainer for JPEG-LM (arXiv 2408.08459)."""

__version__ = "0.1.0"
