"""A "GPT4-style" decoder in one file: zeta's `GPT4`, built so that it runs and matches x-transformers 2.31.10.

zeta's `GPT4` wraps an x-transformers Decoder in an AutoregressiveWrapper but cannot run (its forward feeds logits
back in as token ids, generate() raises, dim_head is dropped, the flash QK-norm temperature is inverted). This file
computes what x-transformers computes (the tests compare logits, losses, greedy tokens) and has a KV cache. Only torch
and the standard library are imported at module level: the file works copied alone.

The math (T queries, L keys, H heads, d dim_head, r = d // 2 rotary channels):
- Block: x += Attn(LN(x)); x += FF(LN(x)); LayerNorms without bias; FF = Linear(D, 4D), exact GELU, Linear(4D, D).
- attn_one_kv_head: one key/value head shared by all H query heads (multi-query attention).
- qk_norm: q and k L2-normalised over d, then times learned per-channel gains (init d ** 0.25) with the usual
  1/sqrt(d) scale (attn_qk_norm_dim_scale), or with a fixed temperature of 10 without gains.
- rotary_xpos: rotary embedding on the first r channels, pairs (0,1), (2,3), ...; xPos multiplies queries by
  zeta ** ((n - c) / 512) and keys by its inverse, zeta_i = (2i + 0.4 r) / (1.4 r): scores decay with distance.
- alibi_pos_bias: score bias -slope_h * |i - j| on the first alibi_num_heads heads only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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
            if type(getattr(self, name)) is not int or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.alibi_pos_bias and not 0 < self.alibi_num_heads <= self.heads:
            raise ValueError(f"alibi_num_heads must be in [1, heads={self.heads}], got {self.alibi_num_heads}")
        if self.qk_norm and self.attn_qk_norm and self.dim_head <= 2:
            raise ValueError("QK-norm needs dim_head > 2 (x-transformers' limit)")
        if self.rotary_xpos and self.dim_head < 2:
            raise ValueError("rotary embeddings need dim_head >= 2")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> GPT4Config:
        """From config.json as save_pretrained writes it."""
        if config.get("model_type") != "minhub-gpt4":
            raise ValueError(f"config.json describes a {config.get('model_type')!r} model, not minhub-gpt4")
        return cls(**{k: v for k, v in config.items() if k in {f.name for f in fields(cls)}})

    @property
    def vocab_size(self) -> int:  # num_tokens under the name every minhub model config answers to
        return self.num_tokens

    @property
    def context_length(self) -> int:  # max_seq_len likewise (docs/contract.md)
        return self.max_seq_len


def alibi_slopes(n: int) -> list[float]:
    """ALiBi head slopes (Press et al. 2022): powers of 2^(-8/n); for n not a power of two, those of the closest
    lower power of two, then every other slope of the next one."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n))  # n itself when n is a power of two (then the second list is empty)
    return power_of_2(closest) + power_of_2(2 * closest)[0::2][: n - closest]


def rotary_xpos_tables(rot_dim: int, max_len: int, scale_base: float = 512.0, base: float = 10000.0) -> torch.Tensor:
    """cos, sin and the xPos scale for positions 0..max_len-1, (3, max_len, rot_dim), channel pairs interleaved."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2).float() / rot_dim)  # (r/2,)
    t = torch.arange(max_len).float()
    angles = torch.outer(t, inv_freq).repeat_interleave(2, dim=-1)  # (max_len, r): pair (2i, 2i+1) turns by θ_i
    zeta = (torch.arange(0, rot_dim, 2).float() + 0.4 * rot_dim) / (1.4 * rot_dim)  # (r/2,), in (0.28, 1)
    power = (t - max_len // 2) / scale_base  # centred, so the scales stay near 1 (the centre cancels in q.k)
    scale = (zeta[None, :] ** power[:, None]).repeat_interleave(2, dim=-1)  # (max_len, r)
    return torch.stack((angles.cos(), angles.sin(), scale))


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rotate (and xPos-scale) the first cos.size(-1) channels of t (..., T, d); the rest pass through."""
    r = cos.size(-1)
    rotated, rest = t[..., :r].float(), t[..., r:]
    pairs = rotated.unflatten(-1, (-1, 2))
    turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (x0, x1, ...) -> (-x1, x0, ...)
    rotated = (rotated * cos + turned * sin) * scale
    return torch.cat((rotated.to(t.dtype), rest), dim=-1)


class KVCache(nn.Module):
    """Keys (rotated) and values of the positions seen so far, preallocated and written in place."""

    def __init__(self, batch_size: int, kv_heads: int, max_len: int, dim_head: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (batch_size, kv_heads, max_len, dim_head)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kv, T, d) at slots [start, start + T) of rows [0, B); return their keys and values so far."""
        B, end = k.size(0), start + k.size(2)
        self.k[:B, :, start:end] = k
        self.v[:B, :, start:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]  # (B, kv, L, d)

    def fits(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this cache can be reused as one of this shape (inference tensors stay in inference mode)."""
        return (self.k.shape[0], self.k.shape[2], self.k.dtype, self.k.device, self.k.is_inference()) == (
            batch_size, max_len, dtype, device, torch.is_inference_mode_enabled())


class Attention(nn.Module):
    def __init__(self, config: GPT4Config) -> None:
        super().__init__()
        H, kv, d = config.heads, 1 if config.attn_one_kv_head else config.heads, config.dim_head
        self.heads, self.kv_heads, self.dim_head = H, kv, d
        self.to_q = nn.Linear(config.dim, H * d, bias=False)
        self.to_k = nn.Linear(config.dim, kv * d, bias=False)
        self.to_v = nn.Linear(config.dim, kv * d, bias=False)
        self.to_out = nn.Linear(H * d, config.dim, bias=False)
        self.qk_norm = config.qk_norm and config.attn_qk_norm
        self.scale = d**-0.5
        if self.qk_norm and config.attn_qk_norm_dim_scale:  # learned gains, d^0.25 each: initial temperature 1
            self.q_scale = nn.Parameter(torch.full((H, 1, d), d**0.25))
            self.k_scale = nn.Parameter(torch.full((kv, 1, d), d**0.25))
        elif self.qk_norm:
            self.q_scale = self.k_scale = None
            self.scale = 10.0  # cosine-similarity attention with a fixed temperature
        self.flash = config.attn_flash
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rotary: torch.Tensor | None, mask: torch.Tensor | None, cache_pos: int | None):
        B, T, _ = x.shape
        q = self.to_q(x).view(B, T, self.heads, self.dim_head).transpose(1, 2)  # (B, H, T, d)
        k = self.to_k(x).view(B, T, self.kv_heads, self.dim_head).transpose(1, 2)  # (B, kv, T, d)
        v = self.to_v(x).view(B, T, self.kv_heads, self.dim_head).transpose(1, 2)  # (B, kv, T, d)
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            if self.q_scale is not None:
                q, k = q * self.q_scale, k * self.k_scale
        if rotary is not None:
            cos, sin, xpos = rotary  # (1, T, r) or (B, 1, T, r) each, for these positions
            q, k = apply_rotary(q, cos, sin, xpos), apply_rotary(k, cos, sin, 1.0 / xpos)  # keys: inverse xPos scale
        if cache_pos is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, kv, L, d), rotated keys of every cached slot
        if self.kv_heads != self.heads:
            k, v = k.expand(B, self.heads, -1, -1), v.expand(B, self.heads, -1, -1)  # one kv head for all
        return self.to_out(self.attend(q, k, v, mask).transpose(1, 2).reshape(B, T, self.heads * self.dim_head))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v. mask: None (causal, or all keys for a single query), a float bias with
        -inf where a key is hidden (ALiBi), or a boolean visibility mask."""
        T = q.size(2)
        causal = mask is None and T > 1
        if self.flash:  # with a float mask (ALiBi), SDPA runs its memory-efficient or math kernel, not FlashAttention
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, T, L)
        if causal:
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
        # an explicit _weight skips nn.Embedding's init (on meta it imports torch._dynamo); see reset_parameters
        self.token_emb = nn.Embedding(config.num_tokens, config.dim,
                                      _weight=torch.empty(config.num_tokens, config.dim))
        self.pos_emb = None
        if config.use_abs_pos_emb and not (config.alibi_pos_bias or config.rotary_xpos):
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
            tables = rotary_xpos_tables(config.dim_head // 2, config.max_seq_len)  # (3, max_len, r): cos, sin, xPos
            self.register_buffer("rotary", tables, persistent=False)

    def reset_parameters(self) -> None:
        """x-transformers' initialisation: kaiming-normal token embedding, PyTorch defaults elsewhere."""
        nn.init.kaiming_normal_(self.token_emb.weight)
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb.weight, std=0.02)

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> None:
        """Allocate the KV cache for `batch_size` rows and `max_len` slots (default max_seq_len); reused if it fits."""
        max_len, w = max_len or self.config.max_seq_len, self.token_emb.weight
        old = self.layers[0].attn.kv_cache
        if old is not None and old.fits(batch_size, max_len, w.dtype, w.device):
            return
        for block in self.layers:
            block.attn.kv_cache = KVCache(batch_size, block.attn.kv_heads, max_len, block.attn.dim_head, w.dtype,
                                          w.device)
        self.cache_len = max_len

    def forward(self, tokens: torch.Tensor, cache_pos: int | None = None, attention_mask: torch.Tensor | None = None,
                *, only_last: bool = False) -> torch.Tensor:
        """Logits (B, T, num_tokens). cache_pos: None for a full forward; an int writes this chunk's keys and values
        into the KV cache at slots [cache_pos, cache_pos + T) and attends to every slot before them. attention_mask:
        (B, cache_pos + T), 0 for left padding: positions count real tokens only. only_last: last position's logits."""
        T, start = tokens.size(1), cache_pos or 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"positions [{start}, {start + T}) exceed max_seq_len={self.config.max_seq_len}: keep the "
                             f"last {self.config.max_seq_len} tokens, or use generate(), which slides")
        if cache_pos is not None and start + T > self.cache_len:
            raise ValueError(f"the KV cache holds {self.cache_len} slots but slots [{start}, {start + T}) were asked "
                             "for: call setup_cache() with a larger max_len (at most max_seq_len)")
        if attention_mask is None:
            pos = torch.arange(start + T, device=tokens.device)  # (L,) every slot's position
        else:
            pos = (attention_mask[:, :start + T].cumsum(-1) - 1).clamp(min=0)  # (B, L) real tokens before each slot
        x = self.token_emb(tokens)  # (B, T, D)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos[..., start:]) * self.config.dim**-0.5
        rotary = self.rotary[:, pos[..., None, start:]] if self.config.rotary_xpos else None  # (3, [B,] 1, T, r)
        mask = self.attention_mask(pos, attention_mask, start, T)
        for block in self.layers:
            x = block(x, rotary, mask, cache_pos)
        x = x[:, -1:] if only_last else x
        return self.to_logits(self.final_norm(x))

    def attention_mask(self, pos: torch.Tensor, attention_mask: torch.Tensor | None, start: int,
                       T: int) -> torch.Tensor | None:
        """What queries at slots start..start+T-1 may see of keys 0..start+T-1: None when plain causal attention
        (or, for one query, everything) will do; else a bool mask, or the ALiBi bias with -inf where a key is hidden:
        (T, L) or (H, T, L) without attention_mask, (B, 1, T, L) or (B, H, T, L) with it. pos: (L,) or (B, L)."""
        if not self.config.alibi_pos_bias and attention_mask is None and (start == 0 or T == 1):
            return None
        L = start + T
        q_slot = torch.arange(start, L, device=pos.device)[:, None]  # (T, 1)
        k_slot = torch.arange(L, device=pos.device)[None, :]  # (1, L)
        visible = k_slot <= q_slot  # (T, L), right-aligned causal
        if attention_mask is not None:
            # a padding slot may see only itself: a query with every key hidden would give NaN in the real rows too
            visible = (visible & attention_mask[:, None, None, :L].bool()) | (k_slot == q_slot)  # (B, 1, T, L)
        if not self.config.alibi_pos_bias:
            return visible
        distance = (pos[..., None, None, :] - pos[..., None, start:, None]).abs()  # (1, T, L) or (B, 1, T, L)
        bias = -distance * self.alibi_slopes  # (H, T, L) or (B, H, T, L)
        return bias.masked_fill(~visible, float("-inf"))


# Sampling filters with x-transformers' semantics: logits (B, V) -> logits with the excluded tokens at -inf
def top_k(logits: torch.Tensor, frac_num_tokens: float = 0.1, k: int | None = None) -> torch.Tensor:
    """Keep the k largest logits; k defaults to ceil(frac_num_tokens * vocabulary)."""
    k = math.ceil(frac_num_tokens * logits.size(-1)) if k is None else k
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


class AutoregressiveWrapper(nn.Module):
    """x-transformers' AutoregressiveWrapper: `wrapper(tokens)` is the next-token cross-entropy loss."""

    def __init__(self, net: Transformer, ignore_index: int = -100, pad_value: int = 0) -> None:
        super().__init__()
        self.net, self.ignore_index, self.pad_value = net, ignore_index, pad_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of predicting x[:, 1:] from x[:, :-1]; targets equal to ignore_index don't count."""
        inp, target = x[:, :-1], x[:, 1:]
        inp = torch.where(inp == self.ignore_index, self.pad_value, inp)  # ignored inputs become padding
        return F.cross_entropy(self.net(inp).transpose(1, 2), target, ignore_index=self.ignore_index)

    @torch.inference_mode()
    def generate(self, prompts: torch.Tensor, seq_len: int, *, eos_token: int | None = None, temperature: float = 1.0,
                 filter_logits_fn: str | Callable = "top_k", filter_kwargs: dict | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample up to seq_len new tokens after each prompt (B, T); return only the new tokens, (B, seq_len).

        As x-transformers: the filter (a name in FILTERS, or a callable) comes before the division by temperature
        (0 is greedy); a row that samples eos_token is padded with pad_value after it, and generation stops once all
        rows have. Past max_seq_len each token sees the last max_seq_len (the cache is rebuilt: exact). A 1-D prompt
        gives a 1-D result. minhub.generate adds padded batches, streaming, faster sliding and argument checks."""
        if isinstance(filter_logits_fn, str) and filter_logits_fn not in FILTERS:
            raise ValueError(f"filter_logits_fn={filter_logits_fn!r} is unknown: use one of {sorted(FILTERS)}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
        filter_fn = FILTERS.get(filter_logits_fn, filter_logits_fn)
        net, n_ctx = self.net, self.net.config.max_seq_len
        window = (prompts[None] if prompts.dim() == 1 else prompts)[:, -n_ctx:]
        net.setup_cache(window.size(0))
        logits = net(window, 0, only_last=True)[:, -1]  # (B, V)
        new, finished = [], torch.zeros(window.size(0), dtype=torch.bool, device=window.device)
        for step in range(seq_len):
            if temperature == 0:
                token = logits.argmax(dim=-1)
            else:
                probs = (filter_fn(logits.float(), **(filter_kwargs or {})) / temperature).softmax(dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            if eos_token is not None:
                token = torch.where(finished, self.pad_value, token)
                finished |= token == eos_token
            new.append(token)
            if step == seq_len - 1 or bool(finished.all()):
                break
            window = torch.cat((window, token[:, None]), dim=1)
            if window.size(1) <= n_ctx:
                logits = net(token[:, None], window.size(1) - 1)[:, -1]
            else:  # the oldest token leaves the window: positions shift, so the cache is rebuilt
                window = window[:, 1:]
                logits = net(window, 0, only_last=True)[:, -1]
        out = torch.stack(new, dim=1) if new else window.new_empty(window.size(0), 0)
        return out[0] if prompts.dim() == 1 else out


class GPT4(nn.Module):
    """zeta's GPT4, working: `model(tokens)` gives logits, `model.decoder(tokens)` the loss, `model.generate(...)`
    samples. Keyword arguments are GPT4Config fields (overriding `config`'s); an unknown one is a TypeError."""

    def __init__(self, config: GPT4Config | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = replace(config, **kwargs) if config else GPT4Config(**kwargs)
        self.decoder = AutoregressiveWrapper(Transformer(self.config))
        if not self.decoder.net.token_emb.weight.is_meta:
            self.decoder.net.reset_parameters()

    def forward(self, tokens: torch.Tensor, cache_pos: int | None = None, attention_mask: torch.Tensor | None = None,
                *, only_last: bool = False) -> torch.Tensor:
        """Logits (B, T, num_tokens) for token ids (B, T); the arguments are Transformer.forward's."""
        return self.decoder.net(tokens, cache_pos, attention_mask, only_last=only_last)

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> None:
        """Allocate the KV cache (see Transformer.setup_cache)."""
        self.decoder.net.setup_cache(batch_size, max_len)

    def kv_caches(self) -> list[KVCache]:
        """Every layer's KV cache, in order (after setup_cache)."""
        return [block.attn.kv_cache for block in self.decoder.net.layers]

    @property
    def cache_len(self) -> int:
        """Slots of the KV cache set up, 0 before."""
        return self.decoder.net.cache_len

    def generate(self, prompts: torch.Tensor, seq_len: int, **kwargs: Any) -> torch.Tensor:  # see the wrapper's
        return self.decoder.generate(prompts, seq_len, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors to `directory` (position tables are not stored)."""
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        config = {"model_type": "minhub-gpt4", "architectures": ["GPT4"], **asdict(self.config)}  # for from_dict
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, identifier: str | os.PathLike, revision: str | None = None, *,
                        dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> GPT4:
        """Load what save_pretrained wrote, from a directory or a hub repo (both files from one commit).
        minhub.gpt4_from_pretrained adds typed errors naming every misfit, offline hints and a device check."""
        from safetensors.torch import load_file
        directory = Path(identifier).expanduser()
        if not directory.is_dir():
            from huggingface_hub import snapshot_download
            directory = Path(snapshot_download(str(identifier), revision=revision,
                                               allow_patterns=["config.json", "model.safetensors"]))
        config = GPT4Config.from_dict(json.loads((directory / "config.json").read_text()))
        return cls.from_state_dict(config, load_file(directory / "model.safetensors")).to(
            device=device, dtype=dtype or torch.float32).eval()

    @classmethod
    def from_state_dict(cls, config: GPT4Config, state_dict: dict[str, torch.Tensor]) -> GPT4:
        """A GPT4 holding these tensors (no copies)."""
        with torch.device("meta"):  # no memory for random weights about to be replaced
            model = cls(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        model.decoder.net.build_position_tables()  # the meta-device ones hold no values
        return model
