"""Llama, Qwen2 and Mistral in one file: the model with a KV cache, loading the hub's weights, and top-k sampling.

Reading order follows the data: `LlamaConfig` -> `rope_inv_freq` -> `KVCache` -> `RMSNorm` -> `Attention` -> `MLP`
-> `DecoderLayer` -> `Llama`, then loading (`llama_from_pretrained`) and sampling (`generate`). Module names mirror
the checkpoints (`model.layers.N.self_attn.q_proj`, ...): loading is an identity map. The families differ only in
which projections carry a bias, and Mistral's sliding window. Imports only torch and the standard library at module
level. Reference: transformers' modeling_llama.py and modeling_rope_utils.py (the tests compare with them).
Shapes: B batch, T tokens, L cached keys, C hidden_size, nh query heads, nkv key/value heads, hs head_dim, V vocab.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LlamaConfig:
    """Llama-family hyper-parameters, named exactly as in the hub's config.json (defaults: transformers' Llama)."""

    model_type: str = "llama"  # "llama", "qwen2" or "mistral": decides which projections have biases
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008  # SwiGLU width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # grouped-query attention; None means one per query head
    head_dim: int | None = None  # None means hidden_size // num_attention_heads
    max_position_embeddings: int = 2048  # context window
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_parameters: dict[str, Any] | None = None  # rope_type, rope_theta, factor, ...; None: default, theta 10000
    attention_bias: bool = False  # llama only: q, k, v and o projections have biases (qwen2: q, k, v always)
    attention_dropout: float = 0.0
    mlp_bias: bool = False  # llama only
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # mistral only: each query sees the last sliding_window keys
    use_sliding_window: bool = False  # qwen2 only
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"this is a {self.model_type!r} checkpoint; llama.py reads {list(ARCHITECTURES)}")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, **(self.rope_parameters or {})}
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads is no multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={self.hidden_act!r} is not implemented; use 'silu'")
        if (rope_type := self.rope_parameters["rope_type"]) not in ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not implemented; supported: {list(ROPE_TYPES)}")
        if self.model_type == "qwen2" and self.use_sliding_window:
            raise ValueError("Qwen2's use_sliding_window=true is not implemented (only full attention)")

    @property
    def context_length(self) -> int:
        """The most positions the model sees at once: Mistral's sliding window where it is shorter (attention past it
        is not implemented, so generation slides the window there instead)."""
        window = self.sliding_window if self.model_type == "mistral" else None
        return min(self.max_position_embeddings, window or self.max_position_embeddings)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LlamaConfig:
        """Build from a hub config.json dict: transformers 5's rope_parameters or the older top-level rope_theta
        and rope_scaling ("type" or "rope_type"); refuse what this model is not."""
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope["rope_type"] = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope["rope_theta"] = rope.get("rope_theta") or config.get("rope_theta") or 10000.0
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in config.items() if k in known}, "rope_parameters": rope})

    def to_dict(self) -> dict[str, Any]:
        """The config.json that transformers 5 (rope_parameters holds rope_theta and the scaling) and from_dict read."""
        return {"architectures": [ARCHITECTURES[self.model_type]], **asdict(self)}


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Each channel pair's turn per position, (hs / 2,) float32, as transformers' modeling_rope_utils computes it."""
    rope, dim = config.rope_parameters, config.head_dim
    # on the CPU even while the model is built on the meta device: these values are not in the checkpoint
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if rope["rope_type"] == "linear":  # positions / factor, folded into the frequencies
        return inv_freq / rope["factor"]
    if rope["rope_type"] == "llama3":  # Llama 3.1: slow channels slowed by factor, fast ones kept, smooth between
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, smoothed, inv_freq_llama)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """x's channels i + hs/2 and -i, each paired with channel i (transformers' layout; Meta's code pairs neighbours)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache(nn.Module):
    """Keys (rotated) and values seen so far, nkv heads (not repeated per query head), preallocated once."""

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_size: int, dtype, device) -> None:
        super().__init__()
        self.max_len, shape = max_len, (batch_size, n_head, max_len, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) into rows [0, B) at slots [start, start + T); return those rows up to there."""
        B, end = k.size(0), start + k.size(2)
        self.k[:B, :, start:end] = k
        self.v[:B, :, start:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]  # (B, nkv, L, hs) views, no copy


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # normalised in float32 and cast back before the gain, as transformers does (bf16 rounds alike)
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        nh, nkv, hs, C = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        llama = config.model_type == "llama"
        qkv_bias = config.attention_bias if llama else config.model_type == "qwen2"
        self.q_proj = nn.Linear(C, nh * hs, bias=qkv_bias)
        self.k_proj = nn.Linear(C, nkv * hs, bias=qkv_bias)
        self.v_proj = nn.Linear(C, nkv * hs, bias=qkv_bias)
        self.o_proj = nn.Linear(nh * hs, C, bias=llama and config.attention_bias)
        self.head_size, self.gqa, self.attention_dropout = hs, nkv != nh, config.attention_dropout
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask, cache_pos) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, -1, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, -1, self.head_size).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin  # cos, sin: (B or 1, 1, T, hs)
        if cache_pos is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, nkv, L, hs)
        # enable_gqa: query head h reads key/value head h // (nh // nkv), transformers' grouping, with no copy here
        dropout_p = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=dropout_p, enable_gqa=self.gqa)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        C, n, bias = config.hidden_size, config.intermediate_size, config.model_type == "llama" and config.mlp_bias
        self.gate_proj = nn.Linear(C, n, bias=bias)
        self.up_proj = nn.Linear(C, n, bias=bias)
        self.down_proj = nn.Linear(n, C, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask, cache_pos) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Llama-family language model. `model(idx)` maps token ids (B, T) to next-token logits (B, T, vocab_size)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        V, C = config.vocab_size, config.hidden_size
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(V, C, _weight=torch.empty(V, C)),  # no init: on meta it imports torch._dynamo
            layers=nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(C, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.cache_len = 0  # slots in the KV cache, 0 until setup_cache()
        if not self.lm_head.weight.is_meta:  # on the meta device, weights are about to be loaded: skip the init
            self.init_weights()

    def init_weights(self) -> None:
        """transformers' Llama init: N(0, initializer_range) matrices, zero biases, RMSNorm gains 1."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=self.config.initializer_range)
            else:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> None:
        """Allocate the KV cache: `batch_size` rows, `max_len` slots (default context_length); reused if it fits."""
        max_len, w = max_len or self.config.context_length, self.model.embed_tokens.weight
        old = self.model.layers[0].self_attn.kv_cache
        if old is not None and (old.k.shape[0], old.max_len, old.k.dtype, old.k.device, old.k.is_inference()) == (
                batch_size, max_len, w.dtype, w.device, torch.is_inference_mode_enabled()):
            return
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, self.config.num_key_value_heads, max_len,
                                               self.config.head_dim, w.dtype, w.device)
        self.cache_len = max_len

    def kv_caches(self) -> list[KVCache]:
        """Every layer's KV cache, in order (after setup_cache)."""
        return [layer.self_attn.kv_cache for layer in self.model.layers]

    def forward(self, idx: torch.Tensor, cache_pos: int | None = None, attention_mask: torch.Tensor | None = None, *,
                only_last: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T). cache_pos: None, or where this chunk's keys go in the KV cache;
        attention_mask: (B, cache_pos + T), 0 for padding; as in minhub's docs/contract.md."""
        T, start, n_ctx = idx.size(1), cache_pos or 0, self.config.context_length
        if start + T > n_ctx:
            window = "" if n_ctx == self.config.max_position_embeddings else " (Mistral's sliding_window, past which " \
                "attention is not implemented)"
            raise ValueError(f"positions [{start}, {start + T}) do not fit the context window of {n_ctx}{window}: keep "
                             "the last tokens, or use generate(), which slides")
        if cache_pos is not None and start + T > self.cache_len:
            raise ValueError(f"the KV cache holds {self.cache_len} slots but slots [{start}, {start + T}) were asked "
                             "for: call model.setup_cache(batch_size, max_len) with a larger max_len")
        if attention_mask is None:
            pos = torch.arange(start, start + T, device=idx.device)[None]  # (1, T)
        else:
            pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, start:start + T]  # (B, T) real-token count
        x = self.model.embed_tokens(idx)  # (B, T, C)
        # angles in float32; cos and sin cast to the model's dtype, where the rotation is computed, as in transformers
        # computed at each call: a buffer would be rounded by model.to(bfloat16) (wrong angles at large positions)
        freqs = pos[..., None].float() * rope_inv_freq(self.config).to(idx.device)  # (B or 1, T, hs/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B or 1, 1, T, hs): channels i and i + hs/2 turn alike
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = self._attention_mask(attention_mask, start, T, idx.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache_pos)
        return self.lm_head(self.model.norm(x[:, -1:] if only_last else x))  # (B, T or 1, V)

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
            # a padding slot sees only itself: a query with every key masked gives NaN, which a zero weight keeps
            mask = (mask & attention_mask[:, None, None, :L].bool()) | (k_slot == q_slot)  # (B, 1, T, L)
        return mask


# --------------------------------------------------------------------------------------------------------------------
# Loading the hub's weights


def llama_from_state_dict(config: LlamaConfig, state_dict: dict[str, torch.Tensor]) -> Llama:
    """A Llama holding a hub state dict's tensors (no copies: safetensors' memory-mapped tensors stay mapped)."""
    with torch.device("meta"):  # no memory for random weights about to be replaced
        model = Llama(config)
    weights = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}  # old files store RoPE's
    if config.tie_word_embeddings:  # save_pretrained leaves the tied lm_head out
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.load_state_dict(weights, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the shared Parameter: re-tie
    return model


def llama_from_pretrained(identifier: str | os.PathLike = "HuggingFaceTB/SmolLM2-135M", revision: str | None = None,
                          *, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Llama:
    """Load a Llama, Qwen2 or Mistral checkpoint from a hub repo id or a local directory: config.json and
    model.safetensors, or model.safetensors.index.json and its shards; converted to `dtype` (default float32)."""
    from huggingface_hub import errors, hf_hub_download
    from safetensors.torch import load_file
    local, repo = Path(identifier).expanduser(), str(identifier)

    def fetch(filename: str) -> Path:  # a local directory's file, or the hub's (downloaded once, then cached)
        return local / filename if local.is_dir() else Path(hf_hub_download(repo, filename, revision=revision))

    config = LlamaConfig.from_dict(json.loads(fetch("config.json").read_text()))
    try:
        state_dict = load_file(fetch("model.safetensors"))
    except (FileNotFoundError, errors.EntryNotFoundError):  # sharded: the index names the file holding each weight
        shards = sorted(set(json.loads(fetch("model.safetensors.index.json").read_text())["weight_map"].values()))
        state_dict = {name: t for shard in shards for name, t in load_file(fetch(shard)).items()}
    return llama_from_state_dict(config, state_dict).to(device=device, dtype=dtype or torch.float32).eval()


# --------------------------------------------------------------------------------------------------------------------
# Sampling


def sample_top_k(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = 50,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V): greedy at temperature 0, else among the top_k after dividing by it."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # softmax and multinomial in float32, even for half-precision models
    logits, candidates = torch.topk(logits, min(top_k or logits.size(-1), logits.size(-1)))  # (B, k)
    return candidates.gather(-1, torch.multinomial(logits.softmax(-1), 1, generator=generator)).squeeze(-1)


@torch.inference_mode()
def generate(model: Llama, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = 50,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue the prompts idx (B, T) by max_new_tokens sampled tokens; return (B, T + max_new_tokens).

    The prompt fills the KV cache once, then each step feeds one token; past context_length, a full forward of the
    last context_length tokens per step. minhub.generate adds padded batches, EOS, streaming."""
    n_ctx, filled = model.config.context_length, 0  # slots of the KV cache holding idx's keys and values
    model.setup_cache(idx.size(0))
    for _ in range(max_new_tokens):
        if filled == 0 or idx.size(1) > n_ctx:  # the prompt, or past the window: a full forward of the last n_ctx
            logits, filled = model(idx[:, -n_ctx:], 0, only_last=True), min(idx.size(1), n_ctx)
        else:  # the tokens not yet in the cache: the last one
            logits, filled = model(idx[:, filled:], filled), idx.size(1)
        token = sample_top_k(logits[:, -1], temperature, top_k, generator)  # (B,)
        idx = torch.cat((idx, token[:, None]), dim=1)
    return idx
