"""GPT-2 in one file: the model with a KV cache, loading the hub's weights, and top-k sampling.

Reading order follows the data: `GPT2Config` -> `KVCache` -> `CausalSelfAttention` -> `MLP` -> `Block` -> `GPT2`,
then loading (`gpt2_from_pretrained`) and sampling (`generate`). Module names mirror the hub checkpoints, so loading
is an identity map plus three quirks (`hub_name_to_minhub`). Only torch and the standard library are imported at
module level: the file works copied alone (minhub.hub and minhub.generation build on it).

References: Radford et al. 2019; transformers' modeling_gpt2.py (the tests' reference); nanoGPT; gpt-fast.
Shapes: B batch, T tokens, L cached keys, C n_embd, nh heads, hs head size, V vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu_new": partial(F.gelu, approximate="tanh"),  # what every OpenAI GPT-2 checkpoint uses
               "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"), "gelu": F.gelu, "relu": F.relu,
               "silu": F.silu, "swish": F.silu}


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
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function={self.activation_function!r} is not implemented; use one of "
                             f"{sorted(ACTIVATIONS)}")

    @property
    def context_length(self) -> int:
        """The most positions the model sees at once (the name every minhub model config answers to)."""
        return self.n_positions

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> GPT2Config:
        """Build from a hub config.json dict: read the fields that matter, refuse what this model is not."""
        if config.get("model_type", "gpt2") != "gpt2" or config.get("add_cross_attention"):
            raise ValueError(f"this is a {config.get('model_type')!r} checkpoint, not GPT-2 (model_type must be "
                             "'gpt2', add_cross_attention (an encoder-decoder GPT-2) false)")
        return cls(**{k: v for k, v in config.items() if k in {f.name for f in fields(cls)}})

    def to_dict(self) -> dict[str, Any]:
        """The config.json that transformers and `from_dict` both read."""
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **asdict(self)}


# ------------------------------------------------------- Model --------------------------------------------------------

def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # at inference not even a call: on the CPU each op after a weight matmul starts with cold caches (tens of us)
    return F.dropout(x, p) if training and p > 0 else x


class KVCache(nn.Module):
    """Keys and values seen so far, preallocated and written in place (transformers concatenates the whole cache)."""

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at slots [start, start + T) of rows [0, B); return their keys and values so far."""
        B, end = k.size(0), start + k.size(2)  # B <= the cache's rows: a server decodes only those in use
        self.k[:B, :, start:end] = k
        self.v[:B, :, start:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]  # (B, nh, L, hs) views, no copy

    def fits(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this cache can be reused as one of this shape (inference tensors stay in inference mode)."""
        return (self.k.shape[0], self.k.shape[2], self.k.dtype, self.k.device, self.k.is_inference()) == (
            batch_size, max_len, dtype, device, torch.is_inference_mode_enabled())


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head, self.head_size = config.n_head, config.n_embd // config.n_head
        self.scale = self.head_size**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.upcast = config.reorder_and_upcast_attn
        self.attn_pdrop, self.resid_pdrop = config.attn_pdrop, config.resid_pdrop
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
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=self.scale,
                                           dropout_p=self.attn_pdrop if self.training else 0.0)  # (B, nh, T, hs)
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
        self.act, self.resid_pdrop = ACTIVATIONS[config.activation_function], config.resid_pdrop

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
        C = config.n_embd
        self.transformer = nn.ModuleDict({
            # token and learned absolute position embeddings; an explicit empty _weight skips nn.Embedding's own
            # normal_() init, which on the meta device imports torch._dynamo (~2 s); init_weights() fills them
            "wte": nn.Embedding(config.vocab_size, C, _weight=torch.empty(config.vocab_size, C)),
            "wpe": nn.Embedding(config.n_positions, C, _weight=torch.empty(config.n_positions, C)),
            "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            "ln_f": nn.LayerNorm(C, eps=config.layer_norm_epsilon),
        })
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.cache_len = 0  # slots in the KV cache, 0 until setup_cache()
        if not self.lm_head.weight.is_meta:  # on the meta device, weights are about to be loaded: skip the init
            self.init_weights()

    def init_weights(self) -> None:
        """GPT-2's init (paper, section 2.3): N(0, 0.02), residual projections / sqrt(2 * n_layer), zero biases."""
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:  # LayerNorm gains
                nn.init.ones_(p)

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> None:
        """Allocate the KV cache for `batch_size` rows and `max_len` slots (default n_positions); reused if it fits."""
        max_len, p = max_len or self.config.n_positions, self.transformer.wte.weight  # p: the cache's dtype and device
        old = self.transformer.h[0].attn.kv_cache
        if old is not None and old.fits(batch_size, max_len, p.dtype, p.device):
            return
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_head, max_len, block.attn.head_size, p.dtype,
                                          p.device)
        self.cache_len = max_len

    def kv_caches(self) -> list[KVCache]:
        """Every layer's KV cache, in order (after setup_cache)."""
        return [block.attn.kv_cache for block in self.transformer.h]

    def forward(self, idx: torch.Tensor, cache_pos: int | None = None, attention_mask: torch.Tensor | None = None, *,
                only_last: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for token ids `idx` (B, T). cache_pos: None runs without a cache (training, scoring); an
        int writes idx's keys and values into the KV cache (`setup_cache`) at slots [cache_pos, cache_pos + T) and
        attends to every slot before them. attention_mask: (B, cache_pos + T), 0 for left padding: positions count
        real tokens only, so a padded row computes what it would alone. only_last: logits of the last position only."""
        T, start = idx.size(1), 0 if cache_pos is None else cache_pos
        if start + T > self.config.n_positions:
            raise ValueError(f"positions [{start}, {start + T}) do not fit the context window n_positions="
                             f"{self.config.n_positions}: keep the last tokens, or use generate(), which slides")
        if cache_pos is not None and start + T > self.cache_len:
            raise ValueError(f"the KV cache holds {self.cache_len} slots but slots [{start}, {start + T}) were asked "
                             "for: call model.setup_cache(batch_size, max_len) with a larger max_len")
        if attention_mask is None:
            pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        else:
            pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, start:start + T]  # (B, T) real-token count
        mask = self._attention_mask(attention_mask, start, T, idx.device)
        x = dropout(self.transformer.wte(idx) + self.transformer.wpe(pos), self.config.embd_pdrop, self.training)
        for block in self.transformer.h:
            x = block(x, mask, cache_pos)
        x = x[:, -1:] if only_last else x
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)

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
            # a padding slot may see only itself: a query with every key hidden would give NaN in the real rows too
            mask = (mask & attention_mask[:, None, None, :L].bool()) | (k_slot == q_slot)  # (B, 1, T, L)
        return mask


# --------------------------------------------- Loading the hub's weights ----------------------------------------------

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers some checkpoints store


def hub_name_to_minhub(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One stored weight under our name, or None for a mask buffer. Both hub layouts: the OpenAI repos' (no prefix,
    mask buffers stored) and save_pretrained's (`transformer.` prefix, tied lm_head left out)."""
    name = name.removeprefix("transformer.")
    if MASK_BUFFER.fullmatch(name):
        return None
    name = name if name == "lm_head.weight" else "transformer." + name
    if name.endswith(CONV1D_WEIGHTS) and tensor.dim() == 2:
        tensor = tensor.t()  # Conv1D stores (in, out); nn.Linear wants (out, in)
    return name, tensor


def gpt2_from_state_dict(config: GPT2Config, state_dict: dict[str, torch.Tensor]) -> GPT2:
    """A GPT2 holding a hub state dict's tensors (no copies: safetensors' memory-mapped tensors stay mapped)."""
    with torch.device("meta"):  # no memory for random weights about to be replaced
        model = GPT2(config)
    weights = dict(kv for kv in (hub_name_to_minhub(k, v) for k, v in state_dict.items()) if kv is not None)
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["transformer.wte.weight"]
    model.load_state_dict(weights, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the shared Parameter: re-tie
    return model


def gpt2_from_pretrained(identifier: str | os.PathLike = "gpt2", revision: str | None = None, *,
                         dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> GPT2:
    """Load GPT-2 from a hub repo id ('gpt2', 'gpt2-medium', ...) or a local directory: config.json and
    model.safetensors (or pytorch_model.bin, read with weights_only=True so it cannot run code). minhub.hub's version
    adds sharded files, a pinned commit, errors naming each misfit weight, offline hints and a device check."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors.torch import load_file
    local = Path(identifier).expanduser()

    def fetch(filename: str) -> Path:
        if local.is_dir():
            return local / filename
        return Path(hf_hub_download(str(identifier), filename, revision=revision))

    config = GPT2Config.from_dict(json.loads(fetch("config.json").read_text()))
    try:
        state_dict = load_file(fetch("model.safetensors"))
    except (FileNotFoundError, EntryNotFoundError):
        state_dict = torch.load(fetch("pytorch_model.bin"), map_location="cpu", weights_only=True)
    return gpt2_from_state_dict(config, state_dict).to(device=device, dtype=dtype or torch.float32).eval()


# ------------------------------------------------------ Sampling ------------------------------------------------------

def sample_top_k(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = 50,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V): greedy at temperature 0, else among the top_k after dividing by it."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # softmax and multinomial in float32, even for half-precision models
    if top_k is None or top_k >= logits.size(-1):
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    logits, candidates = torch.topk(logits, top_k)  # (B, k)
    return candidates.gather(-1, torch.multinomial(logits.softmax(-1), 1, generator=generator)).squeeze(-1)


@torch.inference_mode()
def generate(model: GPT2, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = 50,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue the prompts idx (B, T) by max_new_tokens sampled tokens; return (B, T + max_new_tokens).

    The prompt fills the KV cache once, then each step feeds one token; past n_positions, each step reruns the last
    n_positions (positions shift). minhub.generate adds padded batches, EOS, streaming, top-p and faster sliding."""
    n_ctx = model.config.n_positions
    model.setup_cache(idx.size(0))
    logits = model(idx[:, -n_ctx:], 0, only_last=True)[:, -1]
    for step in range(max_new_tokens):
        token = sample_top_k(logits, temperature, top_k, generator)  # (B,)
        idx = torch.cat((idx, token[:, None]), dim=1)
        if step == max_new_tokens - 1:
            break
        if idx.size(1) <= n_ctx:
            logits = model(token[:, None], idx.size(1) - 1)[:, -1]
        else:
            logits = model(idx[:, -n_ctx:], 0, only_last=True)[:, -1]
    return idx
