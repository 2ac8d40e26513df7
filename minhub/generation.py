"""The generation engine: one loop for every model that follows the contract (docs/contract.md), used by
minhub.generate, the CLI and scoring; the server batches on the same contract.

What it adds to the model files' own short `generate`: batches of prompts of different lengths (left padding with
an attention mask), EOS per row (several EOS ids too), streaming token by token and as text, top-k / top-p /
temperature sampling with a seeded generator, a window that slides past the context (exactly, or window_shift tokens
at a time), and argument checks before any work. The loop is gpt-fast's: the KV cache is preallocated once, the
prompt fills it in one forward, then each step feeds one token, through the step minhub.speed.decode_step picks (a
compiled one where this machine has it, else the model's forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from minhub import speed


def check_int(name: str, value: object, low: int, high: int | None = None, *, high_name: str | None = None,
              hint: str = "") -> None:
    """Raise ValueError unless `value` is an int (a bool is not) in [low, high] (high None: no bound), naming `name`,
    the range (high_name: how to call `high`) and `hint` (another value that is allowed)."""
    if isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high):
        return
    if high is not None:
        what = f"an integer in [{low}, {high_name + '=' if high_name else ''}{high}]"
    else:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
    raise ValueError(f"{name} must be {what}{f', {hint};' if hint else ','} got {value!r}")


def check_token_ids(idx: torch.Tensor, vocab_size: int, context: int) -> None:
    """Raise a readable error for token ids the model cannot take (wrong shape or dtype, out of range, too long)."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.long, torch.int):
        raise TypeError(
            "token ids must be an integer tensor of shape (batch, sequence), e.g. torch.tensor([ids]); got "
            + (f"{idx.dtype} of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__)
        )
    if idx.size(1) > context:
        raise ValueError(
            f"the input has {idx.size(1)} tokens but the context window is {context}: "
            f"keep the last {context} tokens (idx[:, -{context}:]) or use generate(), "
            "which slides the window"
        )
    if idx.numel() and not idx.is_meta and (idx.min() < 0 or idx.max() >= vocab_size):
        bad = idx[(idx < 0) | (idx >= vocab_size)].unique().tolist()
        raise ValueError(
            f"token ids {bad[:10]} are outside the vocabulary [0, {vocab_size}): was the prompt encoded "
            "with this model's tokenizer?"
        )


def _fits_a_float(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int past float's range (JSON allows 4,300 digits)
        return False


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for sampling settings that make no sense."""
    if not isinstance(temperature, (int, float)) or not _fits_a_float(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None:
        check_int("top_k", top_k, 1, hint="or None for no top-k filtering")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], or None for no nucleus filtering; got {top_p!r}")


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits (B, V): greedy when temperature is 0, otherwise temperature, then top-k
    (exactly the k largest logits), then top-p (the smallest set of those whose probability reaches top_p)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # softmax and multinomial in float32, even for half-precision models. Logits are taken relative to each row's
    # largest, which stays 0: a temperature too small for float32 (it rounds to 0) then sends the others to -inf and
    # leaves the largest, as temperature -> 0 means, instead of making every logit +-inf or NaN
    logits = logits.float()
    shifted = logits - logits.amax(-1, keepdim=True)
    logits = torch.where(shifted == 0, shifted, shifted / temperature)
    candidates = None  # token ids of the columns of `logits`, when they are a subset of the vocabulary
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k)  # (B, k), sorted descending
    if top_p is not None and top_p < 1:
        if candidates is None:
            logits, candidates = torch.sort(logits, descending=True)
        probs = logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        outside[..., 0] = False  # the most likely token always stays (top_p may round to 0 in float32)
        logits = logits.masked_fill(outside, float("-inf"))
    choice = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(-1)


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked, checked when made (ValueError): the one set of sampling parameters of
    `generate`, `generate_stream`, the CLI and the server. See `sample_next_token`."""

    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float | None = None

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_k, self.top_p)

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One token per row of logits (B, V)."""
        return sample_next_token(logits, self.temperature, self.top_k, self.top_p, generator)


def pad_left(sequences: list[list[int]], pad_id: int = 50256) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts of different lengths into (idx, attention_mask), both (B, longest), for `generate`."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pad_left needs at least one prompt, and every prompt needs at least one token")
    width = max(len(s) for s in sequences)
    idx = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return idx, mask








@torch.inference_mode()
def generate_stream(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    window_shift: int = 1,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), as soon as it is sampled; the arguments are `generate`'s."""
    n_ctx, vocab_size = model.config.context_length, model.config.vocab_size
    check_token_ids(idx, vocab_size, n_ctx)
    sampling = Sampling(temperature, top_k, top_p)
    check_int("max_new_tokens", max_new_tokens, 0)
    if not isinstance(window_shift, int) or not 1 <= window_shift < n_ctx:
        raise ValueError(f"window_shift must be in [1, context_length={n_ctx}), got {window_shift}")
    eos = None
    if eos_token_id is not None:
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=idx.device)
        if eos.numel() == 0 or eos.min() < 0 or eos.max() >= vocab_size:
            raise ValueError(f"eos_token_id {eos_token_id!r} is outside the vocabulary [0, {vocab_size})")
    B, T = idx.shape
    if T == 0:
        raise ValueError("the prompt is empty: give at least one token (GPT-2 prompts often start with 50256)")
    if attention_mask is not None:
        attention_mask = _check_attention_mask(attention_mask, idx)
    if max_new_tokens == 0:
        return

    # the token window the model sees, at most context_length slots; it slides when full
    n_ctx = cache_length(n_ctx, T + max_new_tokens)
    window = torch.empty(B, n_ctx, dtype=torch.long, device=idx.device)
    window[:, :T] = idx
    mask = None
    if attention_mask is not None:
        mask = torch.ones(B, n_ctx, dtype=torch.long, device=idx.device)
        mask[:, :T] = attention_mask
    # one slot more than the window: the keys up to the last usable slot are then never the whole buffer, so a
    # compiled decode step sees the same strides at every position and is not recompiled at the last one
    model.setup_cache(B, n_ctx + 1)
    step_forward = speed.decode_step(model, B, mask is not None)
    model_mask = None if mask is None else mask[:, :T]
    logits = model(window[:, :T], 0, model_mask, only_last=True)[:, -1]  # (B, V) prefill: the prompt, once
    n = T  # filled slots
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        token = sampling.sample(logits, generator)  # (B,)
        if eos is not None:
            token = torch.where(finished, eos[0], token)  # a finished row repeats EOS, as padding
            finished |= torch.isin(token, eos)
        yield token
        if step == max_new_tokens - 1 or (eos is not None and bool(finished.all())):
            return
        slide = n == n_ctx
        if slide:
            # the window is full: drop the oldest window_shift tokens; every kept token's absolute position (and so
            # its keys and values) changes, so the cache is recomputed for the whole window below
            keep = n_ctx - window_shift
            window[:, :keep] = window[:, n - keep:n].clone()
            if mask is not None:
                mask[:, :keep] = mask[:, n - keep:n].clone()
            n = keep
        window[:, n] = token
        model_mask = None if mask is None else mask[:, :n + 1]
        if slide:
            logits = model(window[:, :n + 1], 0, model_mask, only_last=True)[:, -1]
        else:
            logits = step_forward(token[:, None], n, model_mask)[:, -1]  # one new token against the cache
        n += 1


def cache_length(context_length: int, tokens: int) -> int:
    """The window (and KV cache) generate() sets up for `tokens` positions: the whole context where they do not fit
    (the window slides), else the least power of two from 1024 that holds them. A cache of the whole context would
    cost a 128k-token model gigabytes for a short reply; powers of two keep the precompiled steps, one per cache
    length, few."""
    if tokens > context_length:
        return context_length
    return min(context_length, max(1024, 1 << (tokens - 1).bit_length()))


def _check_attention_mask(attention_mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if attention_mask.shape != idx.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, idx has {tuple(idx.shape)}: "
                         "they must match")
    attention_mask = attention_mask.to(device=idx.device, dtype=torch.long)
    if ((attention_mask != 0) & (attention_mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    if (attention_mask[:, 1:] < attention_mask[:, :-1]).any() or (attention_mask[:, -1] == 0).any():
        raise ValueError("attention_mask must be left padding (zeros before the tokens) with at least one real "
                         "token per row: build batches with pad_left(prompts)")
    return attention_mask


def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    window_shift: int = 1,
) -> torch.Tensor:
    """Continue each prompt in `idx` (B, T) by up to `max_new_tokens` tokens; return (B, T + generated).

    temperature: 0 is greedy (argmax); otherwise logits are divided by it before top_k / top_p filtering.
    top_k: sample among the k most likely tokens (None: the whole vocabulary). top_p: nucleus sampling.
    eos_token_id: a row that samples it is finished and is padded with it; generation stops early once every row
        has finished (so fewer than max_new_tokens may be returned, as in transformers).
    attention_mask: (B, T) for left-padded batches of prompts of different lengths (see `pad_left`).
    generator: a seeded torch.Generator makes sampling repeatable.
    window_shift: past the context window every token is predicted from the last context_length tokens (the
        default, 1), which costs a full forward pass per token since positions (GPT-2's learned ones, rotary ones)
        make every cached key stale when the window moves. A larger value drops that many of the oldest tokens at
        once and rebuilds the cache only then: each token then sees between context_length - window_shift and
        context_length previous tokens, and the rebuild cost is shared by window_shift tokens (e.g. 256).
    A 1-D idx is taken as one prompt and gives a 1-D result.
    """
    squeeze = isinstance(idx, torch.Tensor) and idx.dim() == 1
    if squeeze:
        idx = idx[None]
        attention_mask = None if attention_mask is None else attention_mask[None]
    new = list(generate_stream(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
        attention_mask=attention_mask, generator=generator, window_shift=window_shift,
    ))
    out = torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx.clone()
    return out[0] if squeeze else out


def stream_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, **sampling: Any) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece as `generate_stream` samples it.

    tokenizer: a `tokenizers.Tokenizer`. An empty prompt starts from the model's BOS token (GPT-2's <|endoftext|>,
    token 0 for GPT4). A piece can hold several tokens, or none while a character's bytes are still incomplete (an
    emoji spans several GPT-2 tokens).
    Keyword arguments are `generate`'s (temperature, top_k, top_p, eos_token_id, generator, window_shift).
    """
    from tokenizers.decoders import DecodeStream

    ids = tokenizer.encode(prompt).ids if prompt else [getattr(model.config, "bos_token_id", None) or 0]
    idx = torch.tensor([ids], device=next(model.parameters()).device)
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
