"""A "GPT4-style" decoder in one file: the `GPT4` of the zeta library, built so that it runs and matches x-transformers.

zeta's `GPT4` wraps an x-transformers Decoder (ALiBi on some heads, xPos rotary, multi-query attention, QK-norm,
fused attention) in an AutoregressiveWrapper. zeta's own copy cannot run: its forward feeds logits back in as token
ids, generate() raises, `dim_head` is silently dropped (heads are built 64 wide) and, with flash on, the QK-norm
temperature is inverted. This file implements the architecture as x-transformers 2.31.10 computes it (the tests
compare logits, losses and greedy tokens with it), honours `dim_head`, and adds a working KV cache.

Reading order: `GPT4Config` -> position helpers (ALiBi slopes, rotary + xPos tables) -> `KVCache` -> `Attention` ->
`FeedForward` -> `Block` -> `Transformer` -> sampling filters -> `AutoregressiveWrapper` (loss, generate) -> `GPT4`
(the public class, with save_pretrained / from_pretrained) -> `from_x_transformers_state_dict`.

The math, per option (b batch, T queries, L keys, H heads, d dim_head, r = d // 2 rotary channels):
- Block: pre-norm, x += Attn(LN(x)); x += FF(LN(x)); a final LN; LayerNorms have a gain and no bias.
  FF is Linear(D, 4D) -> exact GELU -> Linear(4D, D), with biases. Embedding and logits head are untied, bias-free.
- attn_one_kv_head: one key/value head shared by all H query heads (multi-query attention); the cache stores one.
- qk_norm: q and k are L2-normalised over d. With attn_qk_norm_dim_scale they are then multiplied by learned
  per-head, per-channel gains (initialised to d ** 0.25) and scores use the usual 1/sqrt(d); without it, scores
  use a fixed temperature of 10 (cosine-similarity attention).
- rotary_xpos: rotary embedding on the first r channels of every head, channels paired as (0,1), (2,3), ...;
  xPos multiplies queries by zeta ** ((n - c) / 512) and keys by its inverse, zeta_i = (2i + 0.4 r) / (1.4 r), so a
  score decays with the distance m - n whatever the centre c.
- alibi_pos_bias: score bias -slope_h * |i - j| on the first alibi_num_heads heads, none on the others, so some
  heads stay local and the rest can attend far.
- attn_flash: F.scaled_dot_product_attention; otherwise the same math written out (softmax(q k^T * scale + bias) v).

This file imports only torch and the standard library at module level (safetensors and huggingface_hub are
imported inside save_pretrained / from_pretrained), so it can be copied alone into another project.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPT4Config:
    """The arguments of zeta's GPT4, with its documented defaults (≈ 2.46B parameters)."""

    num_tokens: int = 50432  # vocabulary size
    max_seq_len: int = 8192  # the most tokens the model attends over
    dim: int = 2560
    depth: int = 32
    dim_head: int = 128
    heads: int = 24
    use_abs_pos_emb: bool = False  # as in x-transformers, only used when neither rotary nor ALiBi is on
    alibi_pos_bias: bool = True
    alibi_num_heads: int = 12  # the first alibi_num_heads heads get ALiBi, the others no bias
    rotary_xpos: bool = True
    attn_flash: bool = True  # F.scaled_dot_product_attention instead of the explicit softmax(QK^T)V
    attn_one_kv_head: bool = True  # multi-query attention
    qk_norm: bool = True  # zeta passes both names; QK-norm is on when both are True
    attn_qk_norm: bool = True
    attn_qk_norm_dim_scale: bool = True

    def __post_init__(self) -> None:
        for name in ("num_tokens", "max_seq_len", "dim", "depth", "dim_head", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.alibi_pos_bias and not 0 < self.alibi_num_heads <= self.heads:
            raise ValueError(f"alibi_num_heads must be in [1, heads={self.heads}], got {self.alibi_num_heads}")
        if self.use_qk_norm and self.dim_head <= 2:
            raise ValueError("QK-norm needs dim_head > 2 (x-transformers' limit)")
        if self.rotary_xpos and self.dim_head < 2:
            raise ValueError("rotary embeddings need dim_head >= 2")

    @property
    def use_qk_norm(self) -> bool:
        return self.qk_norm and self.attn_qk_norm

    @property
    def kv_heads(self) -> int:
        return 1 if self.attn_one_kv_head else self.heads

    @property
    def use_abs_pos(self) -> bool:
        return self.use_abs_pos_emb and not (self.alibi_pos_bias or self.rotary_xpos)


# --------------------------------------------------------------------------------------------------------------------
# Position helpers: ALiBi slopes, rotary + xPos tables


def alibi_slopes(n: int) -> list[float]:
    """ALiBi head slopes (Press et al. 2022): 2^(-8/n), its powers; for n not a power of two, the slopes of the
    closest lower power of two plus every other slope of the next one."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + power_of_2(2 * closest)[0::2][: n - closest]


def rotary_xpos_tables(
    rot_dim: int, max_len: int, scale_base: float = 512.0, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos, sin and the xPos scale for positions 0..max_len-1, each (max_len, rot_dim), channel pairs interleaved."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2).float() / rot_dim)  # (r/2,)
    t = torch.arange(max_len).float()
    angles = torch.outer(t, inv_freq).repeat_interleave(2, dim=-1)  # (max_len, r): pair (2i, 2i+1) turns by θ_i
    zeta = (torch.arange(0, rot_dim, 2).float() + 0.4 * rot_dim) / (1.4 * rot_dim)  # (r/2,), in (0.28, 1)
    power = (t - max_len // 2) / scale_base  # centred, so the scales stay near 1 (the centre cancels in q.k)
    scale = (zeta[None, :] ** power[:, None]).repeat_interleave(2, dim=-1)  # (max_len, r)
    return angles.cos(), angles.sin(), scale


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): a quarter turn of every channel pair."""
    x = x.unflatten(-1, (-1, 2))
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rotate (and xPos-scale) the first cos.size(-1) channels of t (..., T, d); the rest pass through."""
    r = cos.size(-1)
    rotated, rest = t[..., :r].float(), t[..., r:]
    rotated = (rotated * cos + rotate_pairs(rotated) * sin) * scale
    return torch.cat((rotated.to(t.dtype), rest), dim=-1)


# --------------------------------------------------------------------------------------------------------------------
# Model


class KVCache(nn.Module):
    """Keys (rotated) and values of the positions seen so far, preallocated and written in place."""

    def __init__(self, batch_size: int, kv_heads: int, max_len: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, kv_heads, L, d)


class Attention(nn.Module):
    def __init__(self, config: GPT4Config) -> None:
        super().__init__()
        H, kv, d = config.heads, config.kv_heads, config.dim_head
        self.heads, self.kv_heads, self.dim_head = H, kv, d
        self.to_q = nn.Linear(config.dim, H * d, bias=False)
        self.to_k = nn.Linear(config.dim, kv * d, bias=False)
        self.to_v = nn.Linear(config.dim, kv * d, bias=False)
        self.to_out = nn.Linear(H * d, config.dim, bias=False)
        self.qk_norm = config.use_qk_norm
        self.scale = d**-0.5
        if self.qk_norm and config.attn_qk_norm_dim_scale:
            self.q_scale = nn.Parameter(torch.full((H, 1, d), d**0.25))  # learned gains; d^0.25 each makes
            self.k_scale = nn.Parameter(torch.full((kv, 1, d), d**0.25))  # the initial temperature 1/sqrt(d) * sqrt(d) = 1
        elif self.qk_norm:
            self.q_scale = self.k_scale = None
            self.scale = 10.0  # cosine-similarity attention with a fixed temperature
        self.flash = config.attn_flash
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rotary: tuple | None, mask: torch.Tensor | None, cache_pos: int | None):
        B, T, _ = x.shape
        q = self.to_q(x).view(B, T, self.heads, self.dim_head).transpose(1, 2)  # (B, H, T, d)
        k = self.to_k(x).view(B, T, self.kv_heads, self.dim_head).transpose(1, 2)  # (B, kv, T, d)
        v = self.to_v(x).view(B, T, self.kv_heads, self.dim_head).transpose(1, 2)  # (B, kv, T, d)
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            if self.q_scale is not None:
                q, k = q * self.q_scale, k * self.k_scale
        if rotary is not None:
            cos, sin, xpos = rotary  # (T, r) each, for these T positions
            q = apply_rotary(q, cos, sin, xpos)
            k = apply_rotary(k, cos, sin, 1.0 / xpos)  # keys get the inverse xPos scale
        if cache_pos is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, kv, L, d), rotated keys of every cached slot
        if self.kv_heads != self.heads:
            k, v = k.expand(B, self.heads, -1, -1), v.expand(B, self.heads, -1, -1)  # one kv head for all
        y = self.attend(q, k, v, mask)  # (B, H, T, d)
        return self.to_out(y.transpose(1, 2).reshape(B, T, self.heads * self.dim_head))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v. mask: None (causal, or all keys for a single query), a float bias with
        -inf where a key is hidden (ALiBi), or a boolean visibility mask."""
        T = q.size(2)
        if self.flash:
            # a float mask (ALiBi) rules out the FlashAttention kernel; SDPA then picks the memory-efficient or
            # math kernel by itself
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                                  scale=self.scale)
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, T, L)
        if mask is None and T > 1:
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores + mask if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1) @ v


class FeedForward(nn.Module):
    def __init__(self, config: GPT4Config) -> None:
        super().__init__()
        self.proj_in = nn.Linear(config.dim, 4 * config.dim)
        self.proj_out = nn.Linear(4 * config.dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.gelu(self.proj_in(x)))


class Block(nn.Module):
    def __init__(self, config: GPT4Config) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.dim, bias=False)
        self.attn = Attention(config)
        self.ff_norm = nn.LayerNorm(config.dim, bias=False)
        self.ff = FeedForward(config)

    def forward(self, x, rotary, mask, cache_pos):
        x = x + self.attn(self.attn_norm(x), rotary, mask, cache_pos)
        return x + self.ff(self.ff_norm(x))


class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, num_tokens): x-transformers' TransformerWrapper + Decoder."""

    def __init__(self, config: GPT4Config) -> None:
        super().__init__()
        self.config = config
        # an explicit empty _weight skips nn.Embedding's own init (which on the meta device imports torch._dynamo);
        # reset_parameters() initialises them
        self.token_emb = nn.Embedding(config.num_tokens, config.dim,
                                      _weight=torch.empty(config.num_tokens, config.dim))
        self.pos_emb = None
        if config.use_abs_pos:
            self.pos_emb = nn.Embedding(config.max_seq_len, config.dim,
                                        _weight=torch.empty(config.max_seq_len, config.dim))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(config.dim, bias=False)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)
        self.build_position_tables()
        self.cache_len = 0

    def build_position_tables(self) -> None:
        """ALiBi slopes and rotary/xPos tables: computed from the config, never stored in checkpoints."""
        config = self.config
        slopes = torch.zeros(config.heads)
        if config.alibi_pos_bias:
            slopes[: config.alibi_num_heads] = torch.tensor(alibi_slopes(config.alibi_num_heads))
        self.register_buffer("alibi_slopes", slopes.view(-1, 1, 1), persistent=False)  # (H, 1, 1), 0 = no bias
        if config.rotary_xpos:
            cos, sin, scale = rotary_xpos_tables(config.dim_head // 2, config.max_seq_len)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
            self.register_buffer("xpos_scale", scale, persistent=False)

    def reset_parameters(self) -> None:
        """x-transformers' initialisation: kaiming-normal token embedding, PyTorch defaults elsewhere."""
        nn.init.kaiming_normal_(self.token_emb.weight)
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb.weight, std=0.02)

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> None:
        """Allocate the KV cache (reused when it already fits)."""
        max_len = max_len or self.config.max_seq_len
        w = self.token_emb.weight
        old = self.layers[0].attn.kv_cache
        if old is not None and old.k.shape[0] == batch_size and old.k.shape[2] == max_len and old.k.dtype == w.dtype \
                and old.k.device == w.device and old.k.is_inference() == torch.is_inference_mode_enabled():
            return
        for block in self.layers:
            block.attn.kv_cache = KVCache(batch_size, self.config.kv_heads, max_len, self.config.dim_head, w.dtype,
                                          w.device)
        self.cache_len = max_len

    def clear_cache(self) -> None:
        for block in self.layers:
            block.attn.kv_cache = None
        self.cache_len = 0

    def forward(self, tokens: torch.Tensor, cache_pos: int | None = None, *, only_last: bool = False) -> torch.Tensor:
        """Logits (B, T, num_tokens). cache_pos: None for a full forward; an int writes this chunk's keys and values
        into the KV cache at slots [cache_pos, cache_pos + T) and attends to every slot before them."""
        B, T = tokens.shape
        start = cache_pos or 0
        if cache_pos is None:
            check_tokens(tokens, self.config)
        elif start + T > self.cache_len:
            raise ValueError(f"the KV cache holds {self.cache_len} slots but slots [{start}, {start + T}) were asked "
                             "for: call setup_cache() with a larger max_len (at most max_seq_len)")
        x = self.token_emb(tokens)  # (B, T, D)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=tokens.device)) * self.config.dim**-0.5
        rotary = None
        if self.config.rotary_xpos:
            rotary = (self.rotary_cos[start:start + T], self.rotary_sin[start:start + T],
                      self.xpos_scale[start:start + T])
        mask = self.attention_mask(start, T, tokens.device)
        for block in self.layers:
            x = block(x, rotary, mask, cache_pos)
        if only_last:
            x = x[:, -1:]
        return self.to_logits(self.final_norm(x))

    def attention_mask(self, start: int, T: int, device) -> torch.Tensor | None:
        """What queries at slots start..start+T-1 may see of keys 0..start+T-1: None when plain causal attention
        (or, for one query, everything) will do; else (H, T, L) ALiBi bias with -inf on future keys, or a bool mask."""
        use_alibi = self.config.alibi_pos_bias
        if not use_alibi and (start == 0 or T == 1):
            return None
        L = start + T
        q_pos = torch.arange(start, L, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(L, device=device)[None, :]  # (1, L)
        visible = k_pos <= q_pos  # (T, L), right-aligned causal
        if not use_alibi:
            return visible
        bias = -(k_pos - q_pos).abs() * self.alibi_slopes  # (H, T, L)
        return bias.masked_fill(~visible, float("-inf"))


def check_tokens(tokens: torch.Tensor, config: GPT4Config) -> None:
    """Raise a readable error for token ids the model cannot take."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
        raise TypeError("tokens must be an integer tensor of shape (batch, sequence)")
    if tokens.size(1) > config.max_seq_len:
        raise ValueError(f"{tokens.size(1)} tokens exceed max_seq_len={config.max_seq_len}: keep the last "
                         f"{config.max_seq_len} (tokens[:, -{config.max_seq_len}:]) or use generate(), which slides")
    if tokens.numel() and not tokens.is_meta and (tokens.min() < 0 or tokens.max() >= config.num_tokens):
        bad = tokens[(tokens < 0) | (tokens >= config.num_tokens)].unique().tolist()
        raise ValueError(f"token ids {bad[:10]} are outside the vocabulary [0, {config.num_tokens})")


# --------------------------------------------------------------------------------------------------------------------
# Sampling filters (x-transformers' semantics): logits (B, V) -> logits with the excluded tokens at -inf


def top_k(logits: torch.Tensor, frac_num_tokens: float = 0.1, k: int | None = None) -> torch.Tensor:
    """Keep the k largest logits; k defaults to ceil(frac_num_tokens * vocabulary)."""
    if k is None:
        if not 0 < frac_num_tokens <= 1:
            raise ValueError(f"frac_num_tokens must be in (0, 1], got {frac_num_tokens}")
        k = math.ceil(frac_num_tokens * logits.size(-1))
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    values, indices = torch.topk(logits, min(k, logits.size(-1)))
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p(logits: torch.Tensor, thres: float = 0.9) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their probability reaches thres (the one crossing it included)."""
    if not 0 < thres <= 1:
        raise ValueError(f"top_p thres must be in (0, 1], got {thres}")
    sorted_logits, order = torch.sort(logits, descending=True)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    outside = F.pad(cum_probs > thres, (1, -1), value=False)  # shift right: keep the token that crosses thres
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return sorted_logits.scatter(-1, order, sorted_logits)


def top_a(logits: torch.Tensor, min_p_pow: float = 2.0, min_p_ratio: float = 0.02) -> torch.Tensor:
    """Drop tokens whose probability is below min_p_ratio * (top probability) ** min_p_pow."""
    probs = logits.softmax(dim=-1)
    limit = probs.amax(dim=-1, keepdim=True) ** min_p_pow * min_p_ratio
    return logits.masked_fill(probs < limit, float("-inf"))


def min_p(logits: torch.Tensor, min_p: float = 0.1) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top probability."""
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


FILTERS: dict[str, Callable[..., torch.Tensor]] = {"top_k": top_k, "top_p": top_p, "top_a": top_a, "min_p": min_p}


# --------------------------------------------------------------------------------------------------------------------
# Autoregressive wrapper: next-token loss and generation


class AutoregressiveWrapper(nn.Module):
    """x-transformers' AutoregressiveWrapper: `wrapper(tokens)` is the next-token cross-entropy loss."""

    def __init__(self, net: Transformer, ignore_index: int = -100, pad_value: int = 0) -> None:
        super().__init__()
        self.net = net
        self.ignore_index = ignore_index
        self.pad_value = pad_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of predicting x[:, 1:] from x[:, :-1]; targets equal to ignore_index don't count."""
        inp, target = x[:, :-1], x[:, 1:]
        inp = torch.where(inp == self.ignore_index, self.pad_value, inp)  # ignored inputs become padding
        logits = self.net(inp)
        return F.cross_entropy(logits.transpose(1, 2), target, ignore_index=self.ignore_index)

    @torch.inference_mode()
    def generate(
        self,
        prompts: torch.Tensor,
        seq_len: int,
        *,
        eos_token: int | None = None,
        temperature: float = 1.0,
        filter_logits_fn: str | Callable = "top_k",
        filter_kwargs: dict | None = None,
        cache_kv: bool = True,
        window_shift: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample up to seq_len new tokens after each prompt; return only the new tokens, (B, seq_len).

        The filter (by name, or a callable) is applied to the logits before dividing by temperature; temperature 0
        is greedy. A row that samples eos_token is finished and padded with pad_value after it; generation stops
        early once every row has finished (so fewer than seq_len columns may come back, as in x-transformers).
        Past max_seq_len the model sees the last max_seq_len tokens: with the KV cache, the cache is rebuilt from
        the newest max_seq_len - window_shift tokens whenever it is full (window_shift=1, the default, gives exactly
        what recomputing without a cache gives; larger values trade that for speed). A 1-D prompt gives a 1-D result.
        """
        net, config = self.net, self.net.config
        squeeze = isinstance(prompts, torch.Tensor) and prompts.dim() == 1
        if squeeze:
            prompts = prompts[None]
        check_tokens(prompts[:, -config.max_seq_len:], config)
        if prompts.size(1) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
            raise ValueError(f"seq_len must be an integer >= 0, got {seq_len!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
        if isinstance(filter_logits_fn, str):
            if filter_logits_fn not in FILTERS:
                raise ValueError(f"filter_logits_fn={filter_logits_fn!r} is unknown: use one of {sorted(FILTERS)} "
                                 "or a callable")
            filter_logits_fn = FILTERS[filter_logits_fn]
        if not 1 <= window_shift < config.max_seq_len:
            raise ValueError(f"window_shift must be in [1, max_seq_len={config.max_seq_len}), got {window_shift}")
        filter_kwargs = filter_kwargs or {}

        def sample(logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,)
            if temperature == 0:
                return logits.argmax(dim=-1)
            probs = (filter_logits_fn(logits.float(), **filter_kwargs) / temperature).softmax(dim=-1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

        B, n_ctx = prompts.size(0), config.max_seq_len
        out = torch.empty(B, seq_len, dtype=torch.long, device=prompts.device)
        if cache_kv:
            window = torch.empty(B, n_ctx, dtype=torch.long, device=prompts.device)
            n = min(prompts.size(1), n_ctx)
            window[:, :n] = prompts[:, -n:]
            net.setup_cache(B, n_ctx)
            logits = net(window[:, :n], 0, only_last=True)[:, -1]
        else:
            history = prompts
            logits = net(history[:, -n_ctx:], only_last=True)[:, -1]
        finished = torch.zeros(B, dtype=torch.bool, device=prompts.device)
        steps = seq_len
        for step in range(seq_len):
            token = sample(logits)
            if eos_token is not None:
                token = torch.where(finished, self.pad_value, token)
                finished |= token == eos_token
            out[:, step] = token
            if step == seq_len - 1 or (eos_token is not None and bool(finished.all())):
                steps = step + 1
                break
            if not cache_kv:
                history = torch.cat((history, token[:, None]), dim=1)
                logits = net(history[:, -n_ctx:], only_last=True)[:, -1]
            elif n == n_ctx:  # window full: drop the oldest window_shift tokens and rebuild the cache
                keep = n_ctx - window_shift
                window[:, :keep] = window[:, n - keep:n].clone()
                window[:, keep] = token
                n = keep + 1
                logits = net(window[:, :n], 0, only_last=True)[:, -1]
            else:
                window[:, n] = token
                logits = net(token[:, None], n)[:, -1]
                n += 1
        out = out[:, :steps]
        return out[0] if squeeze else out


# --------------------------------------------------------------------------------------------------------------------
# The public class


class GPT4(nn.Module):
    """zeta's GPT4, working: `model(tokens)` gives logits, `model.decoder(tokens)` the loss, `model.generate(...)`
    samples. Arguments are GPT4Config's; unknown ones raise a TypeError that names them."""

    def __init__(self, config: GPT4Config | None = None, **kwargs: Any) -> None:
        super().__init__()
        known = {f.name for f in fields(GPT4Config)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"GPT4() got unknown keyword arguments {unknown}; it takes {sorted(known)}")
        if config is not None and kwargs:
            raise TypeError("give either a GPT4Config or keyword arguments, not both")
        self.config = config or GPT4Config(**kwargs)
        self.decoder = AutoregressiveWrapper(Transformer(self.config))
        if not self.decoder.net.token_emb.weight.is_meta:
            self.decoder.net.reset_parameters()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, num_tokens) for token ids (B, T)."""
        return self.decoder.net(tokens)

    def generate(self, prompts: torch.Tensor, seq_len: int, **kwargs: Any) -> torch.Tensor:
        """See AutoregressiveWrapper.generate."""
        return self.decoder.generate(prompts, seq_len, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors to `directory` (position tables are not stored)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        config = {"model_type": "minhub-gpt4", "architectures": ["GPT4"], **asdict(self.config)}
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        identifier: str | os.PathLike,
        revision: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> GPT4:
        """Load what save_pretrained wrote, from a directory or a hub repo id (config and weights from one commit)."""
        from safetensors import SafetensorError, safe_open

        directory = _snapshot(identifier, revision, cache_dir=cache_dir, local_files_only=local_files_only,
                              token=token)
        config_path, weights_path = directory / "config.json", directory / "model.safetensors"
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{identifier} has no {path.name}: is it a directory written by "
                                        "GPT4.save_pretrained (or minhub train --model gpt4)?")
        config_dict = json.loads(config_path.read_text())
        if config_dict.get("model_type") != "minhub-gpt4":
            raise ValueError(f"{config_path} describes a {config_dict.get('model_type')!r} model, not minhub-gpt4")
        known = {f.name for f in fields(GPT4Config)}
        config = GPT4Config(**{k: v for k, v in config_dict.items() if k in known})
        with torch.device("meta"):
            model = cls(config)
        try:
            with safe_open(str(weights_path), framework="pt") as f:
                state = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{weights_path} is not a readable safetensors file ({e}): it is corrupt or "
                             "truncated; write or download it again") from e
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        misshaped = sorted(f"{n} {tuple(state[n].shape)} (expected {tuple(p.shape)})"
                           for n, p in model.state_dict().items() if n in state and state[n].shape != p.shape)
        if missing or unexpected or misshaped:
            raise ValueError(f"{weights_path} does not fit the config: missing {missing}, unexpected {unexpected}, "
                             f"wrongly shaped {misshaped}")
        model.load_state_dict(state, strict=True, assign=True)
        model.decoder.net.build_position_tables()  # the meta-device ones hold no values
        return model.to(device=device, dtype=dtype or torch.float32).eval()


def _snapshot(identifier, revision, *, cache_dir, local_files_only, token) -> Path:
    """The directory holding the checkpoint: `identifier` itself, or one commit of a hub repo."""
    path = Path(identifier).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import errors, snapshot_download

    try:
        return Path(snapshot_download(str(identifier), revision=revision, cache_dir=cache_dir, token=token,
                                      local_files_only=local_files_only,
                                      allow_patterns=["config.json", "model.safetensors"]))
    except errors.RepositoryNotFoundError as e:
        raise FileNotFoundError(f"no repository {identifier!r} on the hub (for a private one, pass token=...)") from e
    except errors.RevisionNotFoundError as e:
        raise FileNotFoundError(f"{identifier} has no revision {revision!r}") from e
    except errors.HFValidationError as e:
        raise FileNotFoundError(f"{identifier!r} is neither a directory nor a valid hub repo id") from e
    except errors.LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"{identifier!r} (revision {revision or 'main'}) is not in the Hugging Face cache "
                                "and the hub cannot be reached (offline): run once with network access, or pass a "
                                "local directory") from e


# --------------------------------------------------------------------------------------------------------------------
# Converting x-transformers checkpoints


def from_x_transformers_state_dict(
    state_dict: dict[str, torch.Tensor], norm_unit_offset: bool = True
) -> dict[str, torch.Tensor]:
    """Map the state dict of an x-transformers `TransformerWrapper(..., attn_layers=Decoder(...))` built with the
    GPT4 options onto GPT4's names.

    x-transformers numbers attention and feed-forward layers alternately (layers.2i is block i's attention,
    layers.2i+1 its feed-forward); its rotary tables are dropped (recomputed). Its LayerNorms store `gamma` with a
    unit offset (gain = gamma + 1, `norm_add_unit_offset=True`, the default); pass norm_unit_offset=False for a
    Decoder built with norm_add_unit_offset=False.
    """
    offset = 1.0 if norm_unit_offset else 0.0
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name.startswith("attn_layers.rotary_pos_emb.") or name.startswith("attn_layers.rel_pos."):
            continue
        parts = name.split(".")
        if name == "token_emb.emb.weight":
            new = "decoder.net.token_emb.weight"
        elif name == "pos_emb.emb.weight":
            new = "decoder.net.pos_emb.weight"
        elif name == "to_logits.weight":
            new = "decoder.net.to_logits.weight"
        elif name == "attn_layers.final_norm.gamma":
            new = "decoder.net.final_norm.weight"
        elif parts[:2] == ["attn_layers", "layers"]:
            index, rest = int(parts[2]), ".".join(parts[3:])
            block, is_attn = index // 2, index % 2 == 0
            prefix = f"decoder.net.layers.{block}."
            renames = {
                "0.0.gamma": "attn_norm.weight" if is_attn else "ff_norm.weight",
                "1.qk_norm_q_scale": "attn.q_scale", "1.qk_norm_k_scale": "attn.k_scale",
                "1.to_q.weight": "attn.to_q.weight", "1.to_k.weight": "attn.to_k.weight",
                "1.to_v.weight": "attn.to_v.weight", "1.to_out.weight": "attn.to_out.weight",
                "1.ff.0.0.weight": "ff.proj_in.weight", "1.ff.0.0.bias": "ff.proj_in.bias",
                "1.ff.2.weight": "ff.proj_out.weight", "1.ff.2.bias": "ff.proj_out.bias",
            }
            if rest not in renames:
                raise KeyError(f"{name}: not part of the GPT4 architecture (was the x-transformers model built with "
                               "other options?)")
            new = prefix + renames[rest]
        else:
            raise KeyError(f"{name}: not part of the GPT4 architecture")
        out[new] = tensor + offset if name.endswith(".gamma") else tensor
    return out
