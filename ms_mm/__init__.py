"""ms-mm: MindSpore-native training backend for large multimodal models."""
__version__ = "0.1.0"
