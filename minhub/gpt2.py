"""GPT-2 in one file: the model, a KV cache, sampling, and loading real weights from the Hugging Face hub.

Reading order: `GPT2Config` -> `KVCache` -> `CausalSelfAttention` -> `MLP` -> `Block` -> `GPT2` (data flows in that
order), then sampling and `generate`, then `gpt2_from_pretrained` / `tokenizer_from_pretrained`.

Module names mirror the hub checkpoints (`transformer.h[i].attn.c_attn`, `lm_head`, ...), so loading is an identity
map plus three documented quirks: the hub's Conv1D weights are stored (in, out) and get transposed into nn.Linear's
(out, in); the stored causal-mask buffers (`h.N.attn.bias`) are dropped because we build the mask ourselves; and
`lm_head` is tied to `wte`.

References:
- Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"; openai/gpt-2 (TensorFlow).
- transformers' `modeling_gpt2.py` (the parity reference in tests), karpathy/nanoGPT `model.py` (layout),
  pytorch-labs/gpt-fast (preallocated KV cache).

This file imports only torch and the standard library at module level. huggingface_hub, safetensors and tokenizers
are imported inside the functions that need them, so the file can be copied alone into another project.

Shapes in comments: B batch, T sequence length, L keys in the cache, C n_embd, nh heads, hs head size, V vocab.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------------------------
# Config


ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # what every OpenAI GPT-2 checkpoint uses
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class LoadError(Exception):
    """Base class of the errors raised while loading a checkpoint; each message says what to do."""


class ConfigError(LoadError, ValueError):
    """config.json asks for something this model does not implement."""


@dataclass
class GPT2Config:
    """GPT-2 hyper-parameters, named exactly as in the hub's config.json."""

    vocab_size: int = 50257
    n_positions: int = 1024  # context window: the most positions the model can see at once
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1  # dropout rates, active only in model.train()
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    scale_attn_weights: bool = True  # divide attention scores by sqrt(head size)
    scale_attn_by_inverse_layer_idx: bool = False  # ... and by (layer index + 1)
    reorder_and_upcast_attn: bool = False  # compute attention in float32 (matters only for fp16/bf16 weights)
    tie_word_embeddings: bool = True  # lm_head shares its weight with transformer.wte
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(
                f"activation_function={self.activation_function!r} is not implemented; "
                f"use one of {sorted(ACTIVATIONS)}"
            )

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> GPT2Config:
        """Build from a hub config.json dict: read the fields that matter, refuse the features we don't implement."""
        model_type = config.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(f"this is a {model_type!r} checkpoint, not GPT-2 (model_type must be 'gpt2')")
        if config.get("add_cross_attention"):
            raise ConfigError("add_cross_attention=True (an encoder-decoder GPT-2) is not implemented")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """The config.json that transformers and `from_dict` both read."""
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **asdict(self)}


# --------------------------------------------------------------------------------------------------------------------
# Model


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout in training; at inference not even a call: every op that follows a weight matmul on the CPU costs
    tens of microseconds (the matmul streamed megabytes through the caches), so decoding keeps them few."""
    return F.dropout(x, p) if training and p > 0 else x


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, preallocated once and written in place.

    Decoding then costs one small write per step instead of HF's `torch.cat` of the whole cache.
    """

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_size: int, dtype, device) -> None:
        super().__init__()
        self.max_len = max_len
        # one spare slot: the keys up to the last usable slot are then never the whole buffer, so a compiled decode
        # step (minhub.fast.compile_decode) sees the same strides at every position and does not recompile there
        shape = (batch_size, n_head, max_len + 1, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at slots [start, start + T); return all keys and values up to there."""
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, nh, L, hs) views, no copy


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.scale = self.head_size**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.upcast = config.reorder_and_upcast_attn
        self.attn_pdrop = config.attn_pdrop
        self.resid_pdrop = config.resid_pdrop
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache_pos: int | None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_size)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        if cache_pos is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, nh, L, hs)
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        # mask=None means plain causal attention, except for one query, which sees every key in the cache
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            dropout_p=self.attn_pdrop if self.training else 0.0,
            scale=self.scale,
        )  # (B, nh, T, hs)
        if self.upcast:
            y = y.to(x.dtype)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble the heads side by side
        return dropout(self.c_proj(y), self.resid_pdrop, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        n_inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, n_inner)
        self.c_proj = nn.Linear(n_inner, config.n_embd)
        self.act = ACTIVATIONS[config.activation_function]
        self.resid_pdrop = config.resid_pdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.c_proj(self.act(self.c_fc(x))), self.resid_pdrop, self.training)


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache_pos: int | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache_pos)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 language model. `model(idx)` maps token ids (B, T) to next-token logits (B, T, vocab_size)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            # token and learned absolute position embeddings; an explicit empty _weight skips nn.Embedding's own
            # normal_() init, which on the meta device imports torch._dynamo (~2 s); init_weights() fills them
            wte=nn.Embedding(config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd)),
            wpe=nn.Embedding(config.n_positions, config.n_embd, _weight=torch.empty(config.n_positions, config.n_embd)),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.cache_len = 0  # slots in the KV cache, 0 until setup_cache()
        if not self.lm_head.weight.is_meta:  # on the meta device, weights are about to be loaded: skip the init
            self.init_weights()

    def init_weights(self) -> None:
        """GPT-2's initialisation, for training from scratch: N(0, 0.02), residual projections scaled down by
        sqrt(2 * n_layer) (GPT-2 paper, section 2.3), zero biases, LayerNorms at identity."""
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)  # LayerNorm gains

    def num_parameters(self) -> int:
        """Parameters counted once (the tied lm_head is wte)."""
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors in the hub's layout (`save_pretrained`'s: `transformer.` prefix,
        Conv1D weights stored (in, out), tied lm_head left out), which gpt2_from_pretrained and transformers load."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {}
        for name, tensor in self.state_dict().items():
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name.endswith(CONV1D_WEIGHTS):
                tensor = tensor.t()
            state[name] = tensor.detach().contiguous().cpu()
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> None:
        """Allocate the KV cache for `batch_size` rows and `max_len` slots (default n_positions); reused if it fits."""
        max_len = max_len or self.config.n_positions
        if max_len > self.config.n_positions:
            raise ValueError(f"max_len={max_len} exceeds the context window n_positions={self.config.n_positions}")
        p = self.transformer.wte.weight  # the cache takes the model's dtype and device
        old = self.transformer.h[0].attn.kv_cache
        if old is not None and old.k.shape[0] == batch_size and old.max_len == max_len and old.k.dtype == p.dtype \
                and old.k.device == p.device and old.k.is_inference() == torch.is_inference_mode_enabled():
            return
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_head, max_len, block.attn.head_size, p.dtype, p.device)
        self.cache_len = max_len

    def clear_cache(self) -> None:
        """Free the KV cache's memory."""
        for block in self.transformer.h:
            block.attn.kv_cache = None
        self.cache_len = 0

    def forward(
        self,
        idx: torch.Tensor,
        cache_pos: int | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        only_last: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids `idx` (B, T).

        cache_pos: None runs the whole sequence without a cache (training, scoring). An int writes idx's keys and
            values into the KV cache (see `setup_cache`) at slots [cache_pos, cache_pos + T) and attends to all slots
            before them: prefill with cache_pos=0, then decode one token at a time.
        attention_mask: (B, cache_pos + T), 1 for real tokens and 0 for left padding; positions are counted over the
            real tokens only, so a padded row computes what it would alone.
        only_last: compute logits for the last position only (B, 1, V), all that sampling needs.
        """
        B, T = idx.shape
        start = 0 if cache_pos is None else cache_pos
        if cache_pos is None:
            check_token_ids(idx, self.config)
        elif start + T > self.cache_len:
            raise ValueError(
                f"the KV cache holds {self.cache_len} slots but slots [{start}, {start + T}) were asked for: "
                "call model.setup_cache(batch_size, max_len) with a larger max_len (at most n_positions)"
            )
        if attention_mask is None:
            pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        else:
            pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, start:start + T]  # (B, T) real-token count
        mask = self._attention_mask(attention_mask, start, T, idx.device)
        x = dropout(self.transformer.wte(idx) + self.transformer.wpe(pos), self.config.embd_pdrop, self.training)
        for block in self.transformer.h:
            x = block(x, mask, cache_pos)
        if only_last:
            x = x[:, -1:]
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)

    def decode_step(self, idx: torch.Tensor, cache_pos: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) of new tokens `idx` (B, T) against the KV cache: `forward(idx, cache_pos, attention_mask)`.

        `generate` calls this once per new token; it is a method of its own so that `minhub.fast.compile_decode` can
        replace it, on one model, with a compiled version.
        """
        return self(idx, cache_pos, attention_mask)

    @staticmethod
    def _attention_mask(attention_mask: torch.Tensor | None, start: int, T: int, device) -> torch.Tensor | None:
        """Boolean (B, 1, T, L) mask of which keys each query may see, or None when SDPA's causal flag suffices."""
        if attention_mask is None and (start == 0 or T == 1):
            return None
        L = start + T
        q_slot = torch.arange(start, L, device=device)[:, None]  # (T, 1)
        k_slot = torch.arange(L, device=device)[None, :]  # (1, L)
        mask = k_slot <= q_slot  # (T, L) causal
        if attention_mask is not None:
            # a padding slot may see only itself: a query row with every key masked would give NaN, and NaN times
            # a zero attention weight is still NaN in the real rows
            mask = (mask & attention_mask[:, None, None, :L].bool()) | (k_slot == q_slot)  # (B, 1, T, L)
        return mask


def check_token_ids(idx: torch.Tensor, config: GPT2Config) -> None:
    """Raise a readable error for token ids the model cannot take (wrong shape or dtype, out of range, too long)."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.long, torch.int):
        raise TypeError(
            "token ids must be an integer tensor of shape (batch, sequence), e.g. torch.tensor([ids]); got "
            + (f"{idx.dtype} of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__)
        )
    if idx.size(1) > config.n_positions:
        raise ValueError(
            f"the input has {idx.size(1)} tokens but the context window is n_positions={config.n_positions}: "
            f"keep the last {config.n_positions} tokens (idx[:, -{config.n_positions}:]) or use generate(), "
            "which slides the window"
        )
    if idx.numel() and not idx.is_meta and (idx.min() < 0 or idx.max() >= config.vocab_size):
        bad = idx[(idx < 0) | (idx >= config.vocab_size)].unique().tolist()
        raise ValueError(
            f"token ids {bad[:10]} are outside the vocabulary [0, {config.vocab_size}): was the prompt encoded "
            "with this model's tokenizer?"
        )


# --------------------------------------------------------------------------------------------------------------------
# Sampling and generation


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for sampling settings that make no sense."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive integer, or None for no top-k filtering; got {top_k!r}")
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
    logits = logits.float() / temperature  # softmax and multinomial in float32, even for half-precision models
    candidates = None  # token ids of the columns of `logits`, when they are a subset of the vocabulary
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k)  # (B, k), sorted descending
    if top_p is not None and top_p < 1:
        if candidates is None:
            logits, candidates = torch.sort(logits, descending=True)
        probs = logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        logits = logits.masked_fill(outside, float("-inf"))
    choice = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(-1)


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
    model: GPT2,
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
    config = model.config
    n_ctx = config.n_positions
    check_token_ids(idx, config)
    check_sampling_args(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(window_shift, int) or not 1 <= window_shift < n_ctx:
        raise ValueError(f"window_shift must be in [1, n_positions={n_ctx}), got {window_shift}")
    eos = None
    if eos_token_id is not None:
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=idx.device)
        if eos.numel() == 0 or eos.min() < 0 or eos.max() >= config.vocab_size:
            raise ValueError(f"eos_token_id {eos_token_id!r} is outside the vocabulary [0, {config.vocab_size})")
    B, T = idx.shape
    if T == 0:
        raise ValueError("the prompt is empty: give at least one token (GPT-2 prompts often start with 50256)")
    if attention_mask is not None:
        attention_mask = _check_attention_mask(attention_mask, idx)
    if max_new_tokens == 0:
        return

    # the token window the model sees, at most n_positions slots; it slides when full
    window = torch.empty(B, n_ctx, dtype=torch.long, device=idx.device)
    window[:, :T] = idx
    mask = None
    if attention_mask is not None:
        mask = torch.ones(B, n_ctx, dtype=torch.long, device=idx.device)
        mask[:, :T] = attention_mask
    model.setup_cache(B, n_ctx)
    model_mask = None if mask is None else mask[:, :T]
    logits = model(window[:, :T], 0, model_mask, only_last=True)[:, -1]  # (B, V) prefill: the prompt, once
    n = T  # filled slots
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
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
            logits = model.decode_step(token[:, None], n, model_mask)[:, -1]  # one new token against the cache
        n += 1


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
    model: GPT2,
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
    window_shift: past the n_positions context window every token is predicted from the last n_positions tokens
        (the default, 1), which costs a full forward pass per token since GPT-2's absolute positions make every
        cached key stale when the window moves. A larger value drops that many of the oldest tokens at once and
        rebuilds the cache only then: each token then sees between n_positions - window_shift and n_positions
        previous tokens, and the rebuild cost is shared by window_shift tokens (e.g. 256 for long generations).
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


# --------------------------------------------------------------------------------------------------------------------
# Loading from the Hugging Face hub or a local directory


class ModelNotFoundError(LoadError, FileNotFoundError):
    """The repository or directory does not exist, or is not in the cache while offline."""


class RevisionNotFoundError(LoadError, FileNotFoundError):
    """The branch, tag or commit does not exist, or is not in the cache while offline."""


class MissingFileError(LoadError, FileNotFoundError):
    """The repository exists but lacks a file the model needs."""


class CheckpointError(LoadError, ValueError):
    """The weights are unreadable (corrupt, truncated, unsafe) or do not fit the model (names or shapes)."""


CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers some checkpoints store


class CheckpointFiles:
    """The files of one checkpoint: a local directory, or one commit of a hub repo.

    The first file fetched from the hub pins the commit its revision pointed to; every later file comes from that
    commit, so a branch that moves during loading cannot mix files from two commits.
    """

    def __init__(
        self,
        identifier: str | os.PathLike,
        revision: str | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
    ) -> None:
        self.identifier = str(identifier)
        self.revision = revision
        self.commit_hash: str | None = None
        self.cache_dir = cache_dir
        self.local_files_only = local_files_only
        self.token = token
        self.force_download = force_download
        path = Path(self.identifier).expanduser()
        self.local_dir = path if path.is_dir() else None
        if self.local_dir is None and (path.is_absolute() or self.identifier.startswith((".", "~"))
                                       or self.identifier.count("/") > 1 or os.sep in self.identifier.replace("/", "")):
            raise ModelNotFoundError(f"{self.identifier!r} looks like a path but is not a directory: check the path, "
                                     "or give a hub repo id such as 'gpt2' or 'openai-community/gpt2-medium'")
        if self.local_dir is not None and revision is not None:
            raise ValueError(f"revision={revision!r} was given for the local directory {self.identifier!r}: "
                             "a directory has no revisions; drop the argument")

    def __str__(self) -> str:
        if self.local_dir is not None:
            return f"directory {self.local_dir}"
        return f"{self.identifier}@{self.commit_hash or self.revision or 'main'}"

    def get(self, filename: str) -> Path | None:
        """Path of `filename` (downloaded if needed), or None if the checkpoint has no such file."""
        if self.local_dir is not None:
            path = self.local_dir / filename
            return path if path.is_file() else None
        return self._download(filename)

    def require(self, filename: str, what: str) -> Path:
        """Like get(), but a missing file raises MissingFileError saying what the file is for."""
        path = self.get(filename)
        if path is None:
            raise MissingFileError(f"{self} has no {filename} ({what}){self.offline_hint()}")
        return path

    def offline_hint(self) -> str:
        """A sentence to append to a missing-file error when only cached files can be seen, else ''."""
        if self.local_dir is None and self._offline():
            return ("; offline, only files downloaded before are found: run once with network access "
                    "(unset HF_HUB_OFFLINE) to fetch it")
        return ""

    def _offline(self) -> bool:
        from huggingface_hub import constants

        return self.local_files_only or constants.HF_HUB_OFFLINE

    def _download(self, filename: str) -> Path | None:
        from huggingface_hub import errors, hf_hub_download

        try:
            path = Path(hf_hub_download(
                self.identifier, filename, revision=self.commit_hash or self.revision, cache_dir=self.cache_dir,
                local_files_only=self.local_files_only, token=self.token, force_download=self.force_download,
            ))
        except errors.HFValidationError as e:
            raise ModelNotFoundError(f"{self.identifier!r} is neither a directory nor a valid hub repo id ({e})") from e
        except errors.GatedRepoError as e:
            raise ModelNotFoundError(f"{self.identifier} is a gated repository: accept its terms on its hub page, "
                                     "then pass token=... (or log in with `hf auth login`)") from e
        except errors.RepositoryNotFoundError as e:
            raise ModelNotFoundError(f"no repository {self.identifier!r} on the hub: check the spelling (e.g. 'gpt2', "
                                     "'openai-community/gpt2-medium'); for a private repo pass token=...") from e
        except errors.RevisionNotFoundError as e:
            raise RevisionNotFoundError(f"{self.identifier} has no revision {self.revision!r}: use a branch, a tag "
                                        "or a full 40-character commit sha") from e
        except errors.LocalEntryNotFoundError as e:
            self._explain_not_cached(e)
            return None  # the repo and revision are cached, this file is not
        except errors.EntryNotFoundError:
            return None  # the repo exists online but has no such file
        if self.commit_hash is None:
            # .../models--org--name/snapshots/<commit>/<filename>: pin that commit for every later file
            snapshot = path.parent
            if snapshot.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", snapshot.name):
                self.commit_hash = snapshot.name
        return path

    def _explain_not_cached(self, err: Exception) -> None:
        """Offline and not cached: say whether the repo, the revision or only the file is missing, then raise."""
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        cache = Path(self.cache_dir or constants.HF_HUB_CACHE)
        repo_dir = cache / repo_folder_name(repo_id=self.identifier, repo_type="model")
        how = ("HF_HUB_OFFLINE=1 or local_files_only=True is set" if self._offline()
               else "the hub could not be reached")
        if not repo_dir.is_dir():
            raise ModelNotFoundError(
                f"{self.identifier!r} is not in the Hugging Face cache ({cache}) and {how}: run once with network "
                "access to download it, check the repo id, or pass a local directory") from err
        revision = self.commit_hash or self.revision or "main"
        if not ((repo_dir / "refs" / revision).is_file() or (repo_dir / "snapshots" / revision).is_dir()):
            refs = sorted(p.name for p in (repo_dir / "refs").glob("*")) if (repo_dir / "refs").is_dir() else []
            commits = sorted(p.name for p in (repo_dir / "snapshots").glob("*"))
            raise RevisionNotFoundError(
                f"revision {revision!r} of {self.identifier} is not in the cache and {how}. Cached branches/tags: "
                f"{refs or 'none'}; cached commits: {commits or 'none'}. Offline, give one of these (a commit as its "
                "full 40-character sha), or run once with network access") from err


def _read_safetensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    state_dict: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:  # memory-mapped: tensors are read straight from the file
                for name in f.keys():
                    state_dict[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({e}): it is corrupt or truncated. Download it again "
                "with force_download=True (or delete it from the cache)"
            ) from e
    return state_dict


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        # weights_only=True: the unpickler builds tensors and plain containers only, never arbitrary objects or code
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects other than tensors, and unpickling them could run "
            "code. Use a checkpoint with model.safetensors, or convert this one only if you trust its author"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e}): delete it and download it again") from e
    if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state_dict


def load_state_dict(files: CheckpointFiles) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under their stored names: model.safetensors, else the sharded safetensors index,
    else pytorch_model.bin (unpickled with weights_only=True)."""
    path = files.get("model.safetensors")
    if path is not None:
        return _read_safetensors([path])
    index = files.get("model.safetensors.index.json")
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map): {e}") from e
        return _read_safetensors([files.require(shard, "a weight shard named in the index") for shard in shards])
    path = files.get("pytorch_model.bin")
    if path is not None:
        return _read_pickle(path)
    raise MissingFileError(f"{files} has no weights: looked for model.safetensors, model.safetensors.index.json and "
                           f"pytorch_model.bin{files.offline_hint()}")


def _names_list(names: list[str] | set[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def hub_to_minhub_state_dict(state_dict: dict[str, torch.Tensor], model: GPT2) -> dict[str, torch.Tensor]:
    """Map a hub GPT-2 state dict onto `model`'s names, or raise CheckpointError naming every misfit.

    Accepts both layouts found on the hub: the OpenAI repos' (no prefix, `h.N.attn.bias` mask buffers stored) and
    `save_pretrained`'s (`transformer.` prefix, `lm_head.weight` left out because it is tied).
    """
    mapped: dict[str, torch.Tensor] = {}
    stored_as: dict[str, str] = {}  # our name -> the name in the file, for error messages
    transposed: set[str] = set()
    for stored_name, tensor in state_dict.items():
        name = stored_name.removeprefix("transformer.")
        if MASK_BUFFER.fullmatch(name):
            continue  # a constant causal mask: the model builds its own
        name = name if name == "lm_head.weight" else "transformer." + name
        if name.endswith(CONV1D_WEIGHTS) and tensor.dim() == 2:
            tensor = tensor.t()  # Conv1D stores (in, out); nn.Linear wants (out, in)
            transposed.add(name)
        mapped[name] = tensor
        stored_as[name] = stored_name

    expected = {name: p.shape for name, p in model.state_dict(keep_vars=True).items()}
    if model.config.tie_word_embeddings:
        del expected["lm_head.weight"]
        head = mapped.pop("lm_head.weight", None)
        wte = mapped.get("transformer.wte.weight")
        if head is not None and wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
            raise CheckpointError("lm_head.weight differs from transformer.wte.weight, but the config says "
                                  "tie_word_embeddings=true: set it to false in config.json if the head is untied")

    def stored_shape(name: str, shape: torch.Size) -> tuple[int, ...]:
        return tuple(shape)[::-1] if name in transposed else tuple(shape)

    missing = expected.keys() - mapped.keys()
    unexpected = [stored_as[n] for n in mapped.keys() - expected.keys()]
    misshaped = [f"{stored_as[n]} {stored_shape(n, mapped[n].shape)} (expected {stored_shape(n, expected[n])})"
                 for n in sorted(expected.keys() & mapped.keys()) if mapped[n].shape != expected[n]]
    problems = []
    if missing:
        problems.append(f"missing weights: {_names_list(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {_names_list(unexpected)}")
    if misshaped:
        problems.append(f"wrongly shaped weights: {_names_list(misshaped)}")
    if problems:
        raise CheckpointError("the checkpoint does not fit the GPT-2 described by its config.json (check that "
                              "config.json and the weights belong together): " + "; ".join(problems))
    return mapped


def gpt2_from_pretrained(
    identifier: str | os.PathLike = "gpt2",
    revision: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> GPT2:
    """Load a GPT-2 checkpoint from the Hugging Face hub or a local directory, ready for inference (eval mode).

    identifier: a hub repo id ('gpt2', 'gpt2-medium', 'distilgpt2', 'org/fine-tune') or a directory holding
        config.json and model.safetensors (or a sharded index, or pytorch_model.bin).
    revision: branch, tag or commit sha (hub only; default 'main'). Offline, a commit must be the full sha.
    dtype: parameter dtype (default float32, whatever the checkpoint stores). device: where to put the model.
    cache_dir, local_files_only, token, force_download: passed to huggingface_hub (HF_HUB_OFFLINE=1 also works
        offline; force_download=True fetches the files again, e.g. after a corrupt download).

    The returned model's `commit_hash` is the commit it was loaded from: pass it as the tokenizer's revision to
    get files from the very same commit.
    """
    files = CheckpointFiles(identifier, revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                            force_download=force_download)
    config_path = files.require("config.json", "the model's hyper-parameters")
    try:
        config_dict = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{config_path} is not valid JSON ({e}): delete it and download it again") from e
    config = GPT2Config.from_dict(config_dict)
    with torch.device("meta"):  # no memory for random weights that are about to be replaced
        model = GPT2(config)
    state_dict = hub_to_minhub_state_dict(load_state_dict(files), model)
    if config.tie_word_embeddings:
        state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the shared Parameter: re-tie
    model.to(device=device, dtype=dtype or torch.float32)
    model.name_or_path = files.identifier
    model.commit_hash = files.commit_hash
    return model.eval()


def tokenizer_from_pretrained(
    identifier: str | os.PathLike = "gpt2",
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
):
    """The checkpoint's tokenizer as a `tokenizers.Tokenizer`: its tokenizer.json, or else GPT-2's byte-level BPE
    built from vocab.json + merges.txt with <|endoftext|> as a special token. Arguments as `gpt2_from_pretrained`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    files = CheckpointFiles(identifier, revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                            force_download=force_download)
    path = files.get("tokenizer.json")
    if path is not None:
        return Tokenizer.from_file(str(path))
    vocab = files.get("vocab.json")
    merges = files.get("merges.txt")
    if vocab is None or merges is None:
        raise MissingFileError(f"{files} has no tokenizer: looked for tokenizer.json, or vocab.json with merges.txt"
                               f"{files.offline_hint()}")
    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tokenizer
