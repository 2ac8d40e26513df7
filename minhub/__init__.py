"""minhub: small, readable, single-file language models that load real pretrained weights from the Hugging Face hub."""

from minhub.gpt2 import (
    GPT2,
    CheckpointError,
    ConfigError,
    GPT2Config,
    LoadError,
    MissingFileError,
    ModelNotFoundError,
    RevisionNotFoundError,
    generate,
    generate_stream,
    gpt2_from_pretrained,
    pad_left,
    sample_next_token,
    tokenizer_from_pretrained,
)
from minhub.gpt4 import GPT4, GPT4Config
from minhub.hardware import CPUFeatureError, DeviceError
from minhub.streaming import stream_text

__version__ = "0.1.0"

__all__ = [
    "GPT2",
    "GPT2Config",
    "GPT4",
    "GPT4Config",
    "CheckpointError",
    "ConfigError",
    "CPUFeatureError",
    "DeviceError",
    "LoadError",
    "MissingFileError",
    "ModelNotFoundError",
    "RevisionNotFoundError",
    "generate",
    "generate_stream",
    "gpt2_from_pretrained",
    "pad_left",
    "sample_next_token",
    "stream_text",
    "tokenizer_from_pretrained",
]
