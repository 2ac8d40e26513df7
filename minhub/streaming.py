"""Text as it is generated: decode tokens one at a time without splitting multi-byte characters."""

from __future__ import annotations

from typing import Any, Iterator

import torch

from minhub.gpt2 import GPT2, generate_stream


def stream_text(model: GPT2, tokenizer: Any, prompt: str, max_new_tokens: int, **sampling: Any) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece as `generate_stream` samples it.

    tokenizer: a `tokenizers.Tokenizer`. An empty prompt starts from the model's BOS token. A piece can hold
    several tokens, or none while a character's bytes are still incomplete (an emoji spans several GPT-2 tokens).
    Keyword arguments are `generate`'s (temperature, top_k, top_p, eos_token_id, generator, window_shift).
    """
    from tokenizers.decoders import DecodeStream

    ids = tokenizer.encode(prompt).ids if prompt else [model.config.bos_token_id]
    idx = torch.tensor([ids], device=model.transformer.wte.weight.device)
    decoder = DecodeStream(skip_special_tokens=True)
    eos = sampling.get("eos_token_id")
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    for token in generate_stream(model, idx, max_new_tokens, **sampling):
        token_id = int(token[0])
        if token_id in eos:
            return
        piece = decoder.step(tokenizer, token_id)
        if piece:
            yield piece
