"""hy-edge converter: Hugging Face / GGUF checkpoints → one ONNX file with emulated FP8 weights."""

from .pipeline import ConversionReport, convert
from .quantize import QuantPolicy

__all__ = ["ConversionReport", "QuantPolicy", "convert"]
