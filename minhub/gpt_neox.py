"""GPT-NeoX (Pythia, StableLM-alpha, RedPajama-INCITE) in one file: the model with a KV cache, loading the hub's
weights, and top-k sampling. Reading order follows the data: `GPTNeoXConfig` -> `apply_rotary` -> `KVCache` ->
`Attention` -> `MLP` -> `Layer` -> `GPTNeoX`, then loading (`gpt_neox_from_pretrained`) and sampling (`generate`).
Module names mirror the checkpoints (`gpt_neox.layers.N.attention.query_key_value`, `embed_out`): loading is an
identity map. Unlike Llama: LayerNorms and biases, one fused head-interleaved q/k/v projection, rotary angles on only
the first channels of each head, and (by default) attention and MLP side by side on the same input. Imports only torch
and the standard library at module level. References: Black et al. 2022 (GPT-NeoX-20B); transformers'
modeling_gpt_neox.py (the tests compare with it).
Shapes: B batch, T tokens, L cached keys, C hidden_size, nh heads, hs head size, r rotary channels, V vocab.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"gelu": F.gelu, **dict.fromkeys(("gelu_new", "gelu_fast", "gelu_pytorch_tanh"),  # transformers' own
                                               partial(F.gelu, approximate="tanh"))}  # formulas: equal up to rounding
IGNORED_BUFFERS = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")  # older files stored them
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",  # the first one found is read: older Pythia
                "pytorch_model.bin", "pytorch_model.bin.index.json")  # revisions ship only .bin files


@dataclass
class GPTNeoXConfig:
    """GPT-NeoX hyper-parameters, named exactly as in the hub's config.json (defaults: transformers' GPT-NeoX-20B)."""

    model_type: str = "gpt_neox"
    vocab_size: int = 50432
    hidden_size: int = 6144
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    intermediate_size: int = 24576  # MLP width
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048  # context window
    layer_norm_eps: float = 1e-5
    # rope_type, rope_theta, partial_rotary_factor (share of each head's channels that turn): see from_dict
    rope_parameters: dict[str, Any] | None = None
    use_parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)); False: the MLP reads x + attn(ln1(x))
    attention_bias: bool = True  # query_key_value and dense
    attention_dropout: float = 0.0  # hidden_dropout is not implemented: every checkpoint of the family has 0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self) -> None:
        if self.model_type != "gpt_neox":
            raise ValueError(f"this is a {self.model_type!r} checkpoint; gpt_neox.py reads only 'gpt_neox'")
        self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                **(self.rope_parameters or {})}
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is no multiple of num_attention_heads")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not implemented; use one of {list(ACTIVATIONS)}")
        if (rope_type := self.rope_parameters["rope_type"]) != "default":
            raise ValueError(f"rope type {rope_type!r} is not implemented; supported: ['default']")

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> GPTNeoXConfig:
        """Build from a hub config.json dict, with transformers 5's rope_parameters or the older top-level keys."""
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope["rope_type"] = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.setdefault("rope_theta", config.get("rotary_emb_base") or config.get("rope_theta") or 10000.0)
        rope.setdefault("partial_rotary_factor", config.get("rotary_pct", config.get("partial_rotary_factor", 0.25)))
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in config.items() if k in known}, "rope_parameters": rope})


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn the first r channels of each head of x (B, nh, T, hs), channel i paired with i + r/2 (rotate_half, the
    layout Llama's files took over from GPT-NeoX); the other channels carry no position."""
    r = cos.size(-1)
    x1, x2, rest = x[..., :r // 2], x[..., r // 2:r], x[..., r:]
    rotated = x[..., :r] * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, rest), dim=-1) if rest.size(-1) else rotated


class KVCache(nn.Module):
    """Keys (rotated) and values seen so far, preallocated once."""

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_size: int, dtype, device) -> None:
        super().__init__()
        self.max_len, shape = max_len, (batch_size, n_head, max_len, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) into rows [0, B) at slots [start, start + T); return those rows up to there."""
        B, end = k.size(0), start + k.size(2)
        self.k[:B, :, start:end] = k
        self.v[:B, :, start:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]  # (B, nh, L, hs) views, no copy


class Attention(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.n_head, self.attention_dropout = config.num_attention_heads, config.attention_dropout
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask, cache_pos) -> torch.Tensor:
        B, T, C = x.shape
        # the fused outputs are grouped by head ([q, k, v] of head 0, then of head 1, ...), not all queries first
        qkv = self.query_key_value(x).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, 3 * hs)
        q, k, v = qkv.chunk(3, dim=-1)  # (B, nh, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # cos, sin: (B or 1, 1, T, r)
        if cache_pos is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, nh, L, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,  # 1/sqrt(hs)
                                           dropout_p=self.attention_dropout if self.training else 0.0)  # (B, nh, T, hs)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention, self.mlp, self.parallel = Attention(config), MLP(config), config.use_parallel_residual

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask, cache_pos) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), cos, sin, mask, cache_pos)
        if self.parallel:  # both branches read x: one communication per layer when sharded; sums in transformers' order
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        x = attn + x
        return self.mlp(self.post_attention_layernorm(x)) + x


class GPTNeoX(nn.Module):
    """GPT-NeoX language model. `model(idx)` maps token ids (B, T) to next-token logits (B, T, vocab_size)."""

    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.config, V, C, rope = config, config.vocab_size, config.hidden_size, config.rope_parameters
        self.gpt_neox = nn.ModuleDict(dict(
            embed_in=nn.Embedding(V, C, _weight=torch.empty(V, C)),  # no init: on meta it imports torch._dynamo
            layers=nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers)),
            final_layer_norm=nn.LayerNorm(C, eps=config.layer_norm_eps),
        ))
        self.embed_out = nn.Linear(C, V, bias=False)  # untied in every Pythia, StableLM-alpha, RedPajama file
        if config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight
        # each rotary channel pair's turn per position (r/2,), as transformers computes it: float32 on the CPU even on
        # the meta device (no checkpoint holds it), not a buffer that model.to(bfloat16) would round
        self.head_size = C // config.num_attention_heads
        r = int(self.head_size * rope["partial_rotary_factor"])  # rotary channels; an odd r rotates r + 1
        self.inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, r, 2, device="cpu").float() / r)
        self.cache_len = 0  # slots in the KV cache, 0 until setup_cache()
        if not self.embed_out.weight.is_meta:  # transformers' init; on meta, weights are about to be loaded
            for name, p in self.named_parameters():  # N(0, initializer_range) matrices, zero biases, unit gains
                nn.init.normal_(p, 0.0, config.initializer_range) if p.dim() == 2 else nn.init.constant_(
                    p, 0.0 if name.endswith("bias") else 1.0)

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> None:
        """Allocate the KV cache: `batch_size` rows, `max_len` slots (default context_length); reused if it fits."""
        max_len, w = max_len or self.config.context_length, self.gpt_neox.embed_in.weight
        old = self.gpt_neox.layers[0].attention.kv_cache
        if old is not None and (old.k.shape[0], old.max_len, old.k.dtype, old.k.device, old.k.is_inference()) == (
                batch_size, max_len, w.dtype, w.device, torch.is_inference_mode_enabled()):
            return
        for layer in self.gpt_neox.layers:
            layer.attention.kv_cache = KVCache(batch_size, self.config.num_attention_heads, max_len, self.head_size,
                                               w.dtype, w.device)
        self.cache_len = max_len

    def kv_caches(self) -> list[KVCache]:
        """Every layer's KV cache, in order (after setup_cache)."""
        return [layer.attention.kv_cache for layer in self.gpt_neox.layers]

    def forward(self, idx: torch.Tensor, cache_pos: int | None = None, attention_mask: torch.Tensor | None = None, *,
                only_last: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T). cache_pos: None, or where this chunk's keys go in the KV cache;
        attention_mask: (B, cache_pos + T), 0 for padding; as in minhub's docs/contract.md."""
        T, start, n_ctx = idx.size(1), cache_pos or 0, self.config.context_length
        if start + T > n_ctx:
            raise ValueError(f"positions [{start}, {start + T}) do not fit the context window max_position_embeddings="
                             f"{n_ctx}: keep the last tokens, or use generate(), which slides")
        if cache_pos is not None and start + T > self.cache_len:
            raise ValueError(f"the KV cache holds {self.cache_len} slots but slots [{start}, {start + T}) were asked "
                             "for: call model.setup_cache(batch_size, max_len) with a larger max_len")
        pos = torch.arange(start, start + T, device=idx.device)[None] if attention_mask is None else (
            attention_mask.cumsum(-1) - 1).clamp(min=0)[:, start:start + T]  # (1 or B, T): a row counts its ones
        x = self.gpt_neox.embed_in(idx)  # (B, T, C)
        self.inv_freq = self.inv_freq.to(idx.device)  # the same tensor once on the right device
        # angles in float32; cos and sin cast to the model's dtype, where the rotation is computed, as in transformers
        freqs = pos[..., None].float() * self.inv_freq  # (B or 1, T, r/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B or 1, 1, T, r): channels i and i + r/2 turn alike
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = self._attention_mask(attention_mask, start, T, idx.device)
        for layer in self.gpt_neox.layers:
            x = layer(x, cos, sin, mask, cache_pos)
        return self.embed_out(self.gpt_neox.final_layer_norm(x[:, -1:] if only_last else x))  # (B, T or 1, V)

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


def gpt_neox_from_state_dict(config: GPTNeoXConfig, state_dict: dict[str, torch.Tensor]) -> GPTNeoX:
    """A GPTNeoX holding a hub state dict's tensors (no copies: safetensors' memory-mapped tensors stay mapped)."""
    with torch.device("meta"):  # no memory for random weights about to be replaced
        model = GPTNeoX(config)
    weights = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_BUFFERS)}
    if config.tie_word_embeddings:  # save_pretrained may leave the tied head out
        weights["embed_out.weight"] = weights["gpt_neox.embed_in.weight"]
    model.load_state_dict(weights, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.embed_out.weight = model.gpt_neox.embed_in.weight  # assign=True replaced the shared Parameter: re-tie
    return model


def gpt_neox_from_pretrained(identifier: str | os.PathLike = "EleutherAI/pythia-160m", revision: str | None = None,
                             *, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> GPTNeoX:
    """Load a GPT-NeoX checkpoint from a hub repo id or a local directory: config.json, then the first of
    WEIGHT_FILES there; converted to `dtype` (default float32)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors.torch import load_file
    local, repo = Path(identifier).expanduser(), str(identifier)

    def fetch(filename: str) -> Path:  # a local directory's file, or the hub's (downloaded once, then cached)
        if local.is_dir() and not (local / filename).is_file():
            raise FileNotFoundError(local / filename)
        return local / filename if local.is_dir() else Path(hf_hub_download(repo, filename, revision=revision))

    def read(path: Path) -> dict[str, torch.Tensor]:  # weights_only: a .bin is a pickle, which could run code
        return load_file(path) if path.suffix == ".safetensors" else torch.load(path, "cpu", weights_only=True)

    config = GPTNeoXConfig.from_dict(json.loads(fetch("config.json").read_text()))
    for name in WEIGHT_FILES:
        try:
            path = fetch(name)
        except (FileNotFoundError, EntryNotFoundError):
            continue
        # sharded: the index names the file holding each weight
        files = sorted(set(json.loads(path.read_text())["weight_map"].values())) if path.suffix == ".json" else [name]
        state_dict = {k: t for file in files for k, t in read(fetch(file)).items()}
        return gpt_neox_from_state_dict(config, state_dict).to(device=device, dtype=dtype or torch.float32).eval()
    raise FileNotFoundError(f"{identifier} holds none of {WEIGHT_FILES}")


@torch.inference_mode()
def generate(model: GPTNeoX, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = 50, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue the prompts idx (B, T) by max_new_tokens tokens, greedy at temperature 0, else sampled among the top_k;
    return (B, T + max_new_tokens). The prompt fills the KV cache once, then each step feeds one token; past
    context_length, a full forward of the last context_length tokens. minhub.generate adds batches, EOS, streaming."""
    n_ctx, filled = model.config.context_length, 0  # slots of the KV cache holding idx's keys and values
    model.setup_cache(idx.size(0))
    for _ in range(max_new_tokens):
        if filled == 0 or idx.size(1) > n_ctx:  # the prompt, or past the window: a full forward of the last n_ctx
            logits, filled = model(idx[:, -n_ctx:], 0, only_last=True), min(idx.size(1), n_ctx)
        else:  # the tokens not yet in the cache: the last one
            logits, filled = model(idx[:, filled:], filled), idx.size(1)
        if temperature == 0:  # greedy
            token = logits[:, -1].argmax(dim=-1)
        else:  # among the top_k after dividing by the temperature; softmax and multinomial in float32, even for bf16
            V = logits.size(-1)
            logits, candidates = torch.topk(logits[:, -1].float() / temperature, min(top_k or V, V))  # (B, k)
            token = candidates.gather(-1, torch.multinomial(logits.softmax(-1), 1, generator=generator))[:, 0]
        idx = torch.cat((idx, token[:, None]), dim=1)
    return idx
