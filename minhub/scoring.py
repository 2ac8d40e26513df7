"""Scoring text with a model: perplexity by the strided loop of the transformers guide "Perplexity of fixed-length
models", and each token's log-probability.

A text longer than the context is read through windows of at most `max_length` tokens that start `stride` tokens
apart. Each window scores only the tokens that no earlier window scored, predicted with everything the window holds
before them as context: with stride < max_length every token after the first is scored exactly once, with at least
max_length - stride tokens of context (stride = 1: the full context for every token, one forward per token). With
stride = max_length (disjoint windows, the cheapest and crudest) the first token of each window goes unscored, as in
the guide. Only one window's logits (or `batch_size` windows') are in
memory at a time, so the length of the text is limited by its token ids alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from minhub.generation import check_int


@dataclass(frozen=True)
class Perplexity:
    """exp(mean negative log-likelihood) over `tokens` scored tokens (all but the first of the text)."""

    perplexity: float
    tokens: int
    mean_nll: float  # nats per token


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over token positions [0, n_tokens), in order: the
    transformers guide's loop, where a window starting at `begin` ends at min(begin + max_length, n_tokens) and
    scores the positions from the previous window's end on (the first window: all but position 0)."""
    spans, scored_to = [], 1
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        spans.append((begin, end, max(scored_to, begin + 1)))  # a window's first token has no context in it
        scored_to = end
        if end == n_tokens:
            break
    return spans


def check_scoring_args(n_tokens: int, context: int, max_length: int | None, stride: int | None,
                       batch_size: int = 1) -> tuple[int, int]:
    """The (max_length, stride) to use, or a ValueError that says what to change."""
    if n_tokens < 2:
        raise ValueError(f"the text has {n_tokens} token{'s' * (n_tokens != 1)}: scoring needs at least 2 (the first "
                         "token has nothing before it to be predicted from)")
    max_length = context if max_length is None else max_length
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= context:
        raise ValueError(f"max_length must be an integer in [2, {context}] (the model's context), got {max_length!r}")
    stride = max(1, max_length // 2) if stride is None else stride
    check_int("stride", stride, 1, max_length, high_name="max_length")
    check_int("batch_size", batch_size, 1)
    return max_length, stride


@torch.inference_mode()
def token_logprobs(model: nn.Module, ids: Sequence[int] | torch.Tensor, *, max_length: int | None = None,
                   stride: int | None = None, batch_size: int = 1, progress: bool = False) -> Iterator[torch.Tensor]:
    """Yield, window by window, the natural-log probability (float64) the model gives each token of `ids`
    (positions 1, 2, ... in order; position 0 has no score). max_length defaults to the model's context, stride
    to max_length // 2; batch_size windows of full length run in one forward. Works for every model that follows
    the contract (docs/contract.md)."""
    context, vocab_size = model.config.context_length, model.config.vocab_size
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    max_length, stride = check_scoring_args(ids.numel(), context, max_length, stride, batch_size)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}): was the text encoded with this model's tokenizer?")
    device = next(model.parameters()).device
    spans = windows(ids.numel(), max_length, stride)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=ids.numel() - 1, unit="tok", dynamic_ncols=True)
    i = 0
    while i < len(spans):
        group = [spans[i]]  # windows of one length share a forward
        while len(group) < batch_size and i + len(group) < len(spans) and \
                spans[i + len(group)][1] - spans[i + len(group)][0] == group[0][1] - group[0][0]:
            group.append(spans[i + len(group)])
        batch = torch.stack([ids[begin:end] for begin, end, _ in group]).to(device)
        logprobs = model(batch).float().log_softmax(dim=-1)  # (B, T, V); position t predicts token t + 1
        predicted = logprobs[:, :-1].gather(-1, batch[:, 1:, None]).squeeze(-1).double()  # (B, T - 1)
        for row, (begin, end, first) in enumerate(group):
            scores = predicted[row, first - begin - 1:].cpu()  # tokens first .. end - 1
            if bar is not None:
                bar.update(scores.numel())
            yield scores
        i += len(group)
    if bar is not None:
        bar.close()


def perplexity(model: nn.Module, ids: Sequence[int] | torch.Tensor, *, max_length: int | None = None,
               stride: int | None = None, batch_size: int = 1, progress: bool = False) -> Perplexity:
    """Perplexity of the token sequence `ids` under `model` by the strided loop (module docstring); arguments as
    token_logprobs."""
    total, count = 0.0, 0
    for scores in token_logprobs(model, ids, max_length=max_length, stride=stride, batch_size=batch_size,
                                 progress=progress):
        total -= scores.sum().item()
        count += scores.numel()
    return Perplexity(perplexity=math.exp(total / count), tokens=count, mean_nll=total / count)
