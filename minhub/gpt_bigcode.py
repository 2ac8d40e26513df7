"""GPT-BigCode (SantaCoder, StarCoder, tiny_starcoder) in one file: the model with a KV cache, loading, sampling.

Reading order follows the data: `GPTBigCodeConfig` -> `KVCache` -> `Attention` -> `MLP` -> `Block` -> `GPTBigCode`,
then loading (`gpt_bigcode_from_pretrained`) and sampling (`generate`). It is GPT-2 with nn.Linear weights (no Conv1D
transposes) and multi-query attention: one key/value head shared by every query head, so the KV cache is n_head
times smaller. Module names mirror the checkpoints (`transformer.h.N.attn.c_attn`, ...): loading is an identity map.
Imports only torch and the standard library at module level. config.json's attention_softmax_in_fp32 flags are not
read (transformers 5 ignores them too). References: Shazeer 2019 (MQA); Allal et al. 2023 (SantaCoder); Li et al.
2023 (StarCoder); transformers' modeling_gpt_bigcode.py (the tests' reference).
Shapes: B batch, T tokens, L cached keys, C n_embd, nh heads, nkv key/value heads (1 or nh), hs head size, V vocab.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

TANH_GELU = partial(F.gelu, approximate="tanh")
ACTIVATIONS = {"gelu_pytorch_tanh": TANH_GELU, "gelu_new": TANH_GELU, "gelu": F.gelu, "relu": F.relu}


@dataclass
class GPTBigCodeConfig:
    """GPT-BigCode hyper-parameters, named exactly as in the hub's config.json (defaults: transformers')."""

    vocab_size: int = 50257
    n_positions: int = 1024  # context window: learned positions, one row of wpe each
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_pytorch_tanh"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1  # dropout rates, active only in model.train()
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02
    scale_attn_weights: bool = True  # divide attention scores by sqrt(head size)
    multi_query: bool = True  # one key/value head for all query heads (every BigCode checkpoint); false: one each
    tie_word_embeddings: bool = True  # lm_head shares its weight with transformer.wte
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function={self.activation_function!r} is not implemented; use one of "
                             f"{sorted(ACTIVATIONS)}")
        self.n_kv_head, self.head_size = 1 if self.multi_query else self.n_head, self.n_embd // self.n_head  # nkv, hs

    @property
    def context_length(self) -> int:
        """The most positions the model sees at once (the name every minhub model config answers to)."""
        return self.n_positions

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> GPTBigCodeConfig:
        """Build from a hub config.json dict: read the fields that matter, refuse what this model is not."""
        if config.get("model_type") != "gpt_bigcode" or config.get("add_cross_attention"):
            raise ValueError(f"this is a {config.get('model_type')!r} checkpoint, not GPT-BigCode (model_type must be "
                             "'gpt_bigcode', add_cross_attention false)")
        return cls(**{k: v for k, v in config.items() if k in {f.name for f in fields(cls)}})


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # at inference not even a call: on the CPU each op after a weight matmul starts with cold caches (tens of us)
    return F.dropout(x, p) if training and p > 0 else x


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, preallocated once, written in place; multi-query: one head."""

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) into the first B rows at slots [start, start + T); return those rows' keys and
        values up to there. Fewer rows than the cache holds use its first rows (a server decodes only those in use)."""
        B, end = k.size(0), start + k.size(2)
        self.k[:B, :, start:end] = k
        self.v[:B, :, start:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]  # (B, nkv, L, hs) views, no copy

    def fits(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this cache can be reused as one of this shape (inference tensors stay in inference mode)."""
        return (self.k.shape[0], self.k.shape[2], self.k.dtype, self.k.device, self.k.is_inference()) == (
            batch_size, max_len, dtype, device, torch.is_inference_mode_enabled())


class Attention(nn.Module):
    def __init__(self, config: GPTBigCodeConfig) -> None:
        super().__init__()
        self.n_head, self.head_size, self.multi_query = config.n_head, config.head_size, config.multi_query
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * config.n_kv_head * config.head_size)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.scale = config.head_size**-0.5 if config.scale_attn_weights else 1.0
        self.attn_pdrop, self.resid_pdrop = config.attn_pdrop, config.resid_pdrop
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache_pos: int | None) -> torch.Tensor:
        (B, T, C), nh, hs = x.shape, self.n_head, self.head_size
        if self.multi_query:  # every head's query (C columns), then the one key and the one value
            q, k, v = self.c_attn(x).split((C, hs, hs), dim=-1)
            q, k, v = q.view(B, T, nh, hs).transpose(1, 2), k[:, None], v[:, None]  # (B, nh | 1, T, hs)
        else:  # head by head, its q, k and v side by side: not GPT-2's [all q | all k | all v]
            q, k, v = self.c_attn(x).view(B, T, nh, 3, hs).permute(3, 0, 2, 1, 4).unbind(0)  # each (B, nh, T, hs)
        if cache_pos is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, nkv, L, hs)
        k, v = k.expand(-1, nh, -1, -1), v.expand(-1, nh, -1, -1)  # multi-query: one head, a stride-0 view, no copy
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=self.scale,
                                           dropout_p=self.attn_pdrop if self.training else 0.0)  # (B, nh, T, hs)
        return dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)), self.resid_pdrop, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPTBigCodeConfig) -> None:
        super().__init__()
        n_inner = config.n_inner or 4 * config.n_embd
        self.c_fc, self.c_proj = nn.Linear(config.n_embd, n_inner), nn.Linear(n_inner, config.n_embd)
        self.act, self.resid_pdrop = ACTIVATIONS[config.activation_function], config.resid_pdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.c_proj(self.act(self.c_fc(x))), self.resid_pdrop, self.training)


class Block(nn.Module):
    def __init__(self, config: GPTBigCodeConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon), Attention(config)
        self.ln_2, self.mlp = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon), MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache_pos: int | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache_pos)
        return x + self.mlp(self.ln_2(x))


class GPTBigCode(nn.Module):
    """GPT-BigCode language model. `model(idx)` maps token ids (B, T) to next-token logits (B, T, vocab_size)."""

    def __init__(self, config: GPTBigCodeConfig) -> None:
        super().__init__()
        self.config = config
        V, C, P = config.vocab_size, config.n_embd, config.n_positions
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, C, _weight=torch.empty(V, C)),  # _weight: no init here (on meta: imports torch._dynamo)
            wpe=nn.Embedding(P, C, _weight=torch.empty(P, C)),  # learned absolute positions
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(C, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.cache_len = 0  # slots in the KV cache, 0 until setup_cache()
        if not self.lm_head.weight.is_meta:  # on the meta device, weights are about to be loaded: skip the init
            self.init_weights()

    def init_weights(self) -> None:
        """transformers' init: N(0, initializer_range), residual projections / sqrt(2 * n_layer), zero biases."""
        std, depth = self.config.initializer_range, math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=std / depth if name.endswith("c_proj.weight") else std)
            else:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)  # LayerNorm gains 1

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> None:
        """Allocate the KV cache for `batch_size` rows and `max_len` slots (default n_positions); reused if it fits."""
        max_len, p, c = max_len or self.config.n_positions, self.transformer.wte.weight, self.config
        old = self.transformer.h[0].attn.kv_cache  # the cache takes the model's dtype and device
        if old is not None and old.fits(batch_size, max_len, p.dtype, p.device):
            return
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, c.n_kv_head, max_len, c.head_size, p.dtype, p.device)
        self.cache_len = max_len

    def kv_caches(self) -> list[KVCache]:
        """Every layer's KV cache, in order (after setup_cache)."""
        return [block.attn.kv_cache for block in self.transformer.h]

    def forward(self, idx: torch.Tensor, cache_pos: int | None = None, attention_mask: torch.Tensor | None = None, *,
                only_last: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T). cache_pos: None, or where this chunk's keys go in the KV cache;
        attention_mask: (B, cache_pos + T), 0 for padding; as in minhub's docs/contract.md."""
        T, start, n_ctx = idx.size(1), cache_pos or 0, self.config.n_positions
        if start + T > n_ctx:
            raise ValueError(f"positions [{start}, {start + T}) do not fit the context window n_positions={n_ctx}: "
                             "keep the last tokens, or use generate(), which slides")
        if cache_pos is not None and start + T > self.cache_len:
            raise ValueError(f"the KV cache holds {self.cache_len} slots but slots [{start}, {start + T}) were asked "
                             "for: call model.setup_cache(batch_size, max_len) with a larger max_len")
        pos = (torch.arange(start, start + T, device=idx.device) if attention_mask is None  # (T,), or (B, T): the
               else (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, start:start + T])  # row's real tokens before
        mask = self._attention_mask(attention_mask, start, T, idx.device)
        x = dropout(self.transformer.wte(idx) + self.transformer.wpe(pos), self.config.embd_pdrop, self.training)
        for block in self.transformer.h:
            x = block(x, mask, cache_pos)
        return self.lm_head(self.transformer.ln_f(x[:, -1:] if only_last else x))  # (B, T or 1, V)

    @staticmethod
    def _attention_mask(attention_mask: torch.Tensor | None, start: int, T: int, device) -> torch.Tensor | None:
        """Boolean (B, 1, T, L) mask of which keys each query may see, or None when SDPA's causal flag suffices."""
        if attention_mask is None and (start == 0 or T == 1):
            return None
        q_slot = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
        k_slot = torch.arange(start + T, device=device)[None, :]  # (1, L), L = start + T
        mask = k_slot <= q_slot  # (T, L) causal
        if attention_mask is not None:
            # a padding slot sees only itself: a query with every key hidden gives NaN, which spreads through 0 weights
            mask = (mask & attention_mask[:, None, None, :start + T].bool()) | (k_slot == q_slot)  # (B, 1, T, L)
        return mask


def gpt_bigcode_from_state_dict(config: GPTBigCodeConfig, state_dict: dict[str, torch.Tensor]) -> GPTBigCode:
    """A GPTBigCode holding a hub state dict's tensors (no copies: safetensors' memory-mapped tensors stay mapped)."""
    with torch.device("meta"):  # no memory for random weights about to be replaced
        model = GPTBigCode(config)
    weights = {name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name: t  # a bare base
               for name, t in state_dict.items()  # model's names lack the prefix; causal-mask buffers are no weights
               if not name.endswith((".attn.bias", ".attn.masked_bias")) and name != "transformer.bias"}
    if config.tie_word_embeddings:  # save_pretrained leaves the tied lm_head out; a stored copy would be the same
        weights["lm_head.weight"] = weights["transformer.wte.weight"]
    model.load_state_dict(weights, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the shared Parameter: re-tie
    return model


def gpt_bigcode_from_pretrained(identifier: str | os.PathLike = "bigcode/tiny_starcoder_py",
                                revision: str | None = None, *, dtype: torch.dtype | None = None,
                                device: str | torch.device | None = None) -> GPTBigCode:
    """Load a GPT-BigCode checkpoint from a hub repo id or a local directory: config.json and the first of `files`
    there is (pytorch_model.bin read with weights_only=True: no code runs), converted to `dtype` (default float32)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors.torch import load_file
    local, repo = Path(identifier).expanduser(), str(identifier)
    files = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

    def fetch(filename: str) -> Path:  # a local directory's file, or the hub's (downloaded once, then cached)
        path = local / filename if local.is_dir() else Path(hf_hub_download(repo, filename, revision=revision))
        if not path.is_file():
            raise FileNotFoundError(f"{identifier} has no {filename}")
        return path

    def load(path: Path) -> dict[str, torch.Tensor]:
        if path.name.endswith(".index.json"):  # sharded: the index names the file holding each weight
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            return {name: t for shard in shards for name, t in load(fetch(shard)).items()}
        return load_file(path) if path.suffix == ".safetensors" else torch.load(path, "cpu", weights_only=True)

    config = GPTBigCodeConfig.from_dict(json.loads(fetch("config.json").read_text()))
    for filename in files:
        try:
            path = fetch(filename)
        except (FileNotFoundError, EntryNotFoundError):  # offline, huggingface_hub raises LocalEntryNotFoundError
            continue
        return gpt_bigcode_from_state_dict(config, load(path)).to(device=device, dtype=dtype or torch.float32).eval()
    raise FileNotFoundError(f"{identifier} holds none of {', '.join(files)}")


def sample_top_k(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = 50,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V): greedy at temperature 0, else among the top_k after dividing by it."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # softmax and multinomial in float32, even for half-precision models
    logits, candidates = torch.topk(logits, min(top_k or logits.size(-1), logits.size(-1)))  # (B, k)
    return candidates.gather(-1, torch.multinomial(logits.softmax(-1), 1, generator=generator)).squeeze(-1)


@torch.inference_mode()
def generate(model: GPTBigCode, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = 50, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue the prompts idx (B, T) by max_new_tokens sampled tokens; return (B, T + max_new_tokens). The prompt
    fills the KV cache once, then each step feeds one token; past n_positions, a full forward of the last n_positions
    per step (learned positions shift). minhub.generate adds padded batches, EOS, streaming."""
    n_ctx, filled = model.config.n_positions, 0  # slots of the KV cache holding idx's keys and values
    model.setup_cache(idx.size(0))
    for _ in range(max_new_tokens):
        if filled == 0 or idx.size(1) > n_ctx:  # the prompt, or past the window: a full forward of the last n_ctx
            logits, filled = model(idx[:, -n_ctx:], 0, only_last=True), min(idx.size(1), n_ctx)
        else:  # the tokens not yet in the cache: the last one
            logits, filled = model(idx[:, filled:], filled), idx.size(1)
        token = sample_top_k(logits[:, -1], temperature, top_k, generator)  # (B,)
        idx = torch.cat((idx, token[:, None]), dim=1)
    return idx
