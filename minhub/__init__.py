"""minhub: small, readable, single-file language models that load real pretrained weights from the Hugging Face hub.

The model files (gpt2.py, llama.py, gpt_neox.py, gpt_bigcode.py, gpt4.py) stand alone and follow one contract
(docs/contract.md); the package adds loading with typed errors (hub.py), one generation engine (generation.py),
perplexity and token scores (scoring.py), tokenizers (tokenizer.py) and chat templates (chat.py), the CPU speed path
(speed.py, matmul.py, precompiled.py, hardware.py), training, the CLI and the server.
"""

from minhub.generation import Sampling, generate, generate_stream, pad_left, sample_next_token, stream_text
from minhub.gpt2 import GPT2, GPT2Config
from minhub.gpt4 import GPT4, GPT4Config
from minhub.llama import Llama, LlamaConfig
from minhub.hardware import CPUFeatureError, DeviceError
from minhub.hub import (
    CheckpointError,
    ConfigError,
    LoadError,
    MissingFileError,
    ModelNotFoundError,
    RevisionNotFoundError,
    from_pretrained,
    gpt2_from_pretrained,
    gpt4_from_pretrained,
    gpt_bigcode_from_pretrained,
    gpt_neox_from_pretrained,
    llama_from_pretrained,
)
from minhub.scoring import Perplexity, perplexity, token_logprobs
from minhub.tokenizer import tokenizer_from_pretrained

__version__ = "0.1.0"

__all__ = [
    "GPT2",
    "GPT2Config",
    "GPT4",
    "GPT4Config",
    "CPUFeatureError",
    "CheckpointError",
    "ConfigError",
    "DeviceError",
    "LoadError",
    "MissingFileError",
    "ModelNotFoundError",
    "Llama",
    "LlamaConfig",
    "Perplexity",
    "RevisionNotFoundError",
    "Sampling",
    "from_pretrained",
    "generate",
    "generate_stream",
    "gpt2_from_pretrained",
    "gpt4_from_pretrained",
    "gpt_bigcode_from_pretrained",
    "gpt_neox_from_pretrained",
    "llama_from_pretrained",
    "pad_left",
    "perplexity",
    "sample_next_token",
    "stream_text",
    "token_logprobs",
    "tokenizer_from_pretrained",
]
