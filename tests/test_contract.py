"""The model contract (docs/contract.md): a model defined here, in the test file, that follows it gets generation,
padded batches, streaming, scoring, serving and the speed path from minhub with no code of its own.

Reference: the same model's plain forward without a cache, one row at a time (a naive greedy loop, log-softmax by
hand), which shares none of the engine's code: caching, padding, batching, compiled steps and the server must all
reproduce it."""

from __future__ import annotations

import concurrent.futures
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TOKENIZER_DIR

from minhub import generate, generate_stream, hardware, matmul, pad_left, perplexity, speed, token_logprobs


@dataclass
class TinyConfig:
    vocab_size: int = 50257
    context_length: int = 24
    dim: int = 16
    heads: int = 2


class KVCache(nn.Module):
    def __init__(self, batch_size, n_kv_heads, max_len, head_size, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start, k, v):
        B, end = k.size(0), start + k.size(2)
        self.k[:B, :, start:end], self.v[:B, :, start:end] = k, v
        return self.k[:B, :, :end], self.v[:B, :, :end]


class TinyLM(nn.Module):
    """One attention layer and an MLP, learned positions: the contract and nothing else."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config, C = config, config.dim
        self.embed, self.position = nn.Embedding(config.vocab_size, C), nn.Embedding(config.context_length, C)
        self.qkv, self.out = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))
        self.norm, self.head = nn.LayerNorm(C), nn.Linear(C, config.vocab_size, bias=False)
        self.cache: KVCache | None = None
        self.cache_len = 0

    def setup_cache(self, batch_size, max_len=None):
        max_len, w = max_len or self.config.context_length, self.embed.weight
        c = self.cache
        if c is None or (c.k.size(0), c.k.size(2), c.k.dtype, c.k.is_inference()) != (
                batch_size, max_len, w.dtype, torch.is_inference_mode_enabled()):
            self.cache = KVCache(batch_size, self.config.heads, max_len, self.config.dim // self.config.heads,
                                 w.dtype, w.device)
        self.cache_len = max_len

    def kv_caches(self):
        return [self.cache]

    def forward(self, idx, cache_pos=None, attention_mask=None, *, only_last=False):
        B, T = idx.shape
        start, H = cache_pos or 0, self.config.heads
        if start + T > self.config.context_length or (cache_pos is not None and start + T > self.cache_len):
            raise ValueError("past the context or the cache")
        L = start + T
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.long, device=idx.device)
        pos = (attention_mask[:, :L].cumsum(-1) - 1).clamp(min=0)
        q_slot, k_slot = torch.arange(start, L)[:, None], torch.arange(L)[None, :]
        mask = ((k_slot <= q_slot) & attention_mask[:, None, None, :L].bool()) | (k_slot == q_slot)
        x = self.embed(idx) + self.position(pos[:, start:])
        q, k, v = self.qkv(x).view(B, T, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if cache_pos is not None:
            k, v = self.cache.update(cache_pos, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, -1)
        x = x + self.out(y)
        x = x + self.mlp(x)
        return self.head(self.norm(x[:, -1:] if only_last else x))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    tiny = TinyLM(TinyConfig()).eval()
    with torch.no_grad():
        for p in tiny.parameters():
            p.normal_(0, 0.3)  # logits far apart: no greedy ties
    return tiny


def naive_greedy(model, prompt: list[int], new: int) -> list[int]:
    """Full forwards without a cache, argmax of the last position, one row; past the context, the last tokens."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            window = torch.tensor([ids[-model.config.context_length:]])
            ids.append(int(model(window)[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[464, 3290, 318], [40], [1212, 318, 257, 1332, 286]]


def test_generation_batches_and_streaming_follow_the_contract(model):
    for prompt in PROMPTS:
        assert generate(model, torch.tensor([prompt]), 30, temperature=0)[0, len(prompt):].tolist() == \
            naive_greedy(model, prompt, 30)  # 30 new tokens: the window slides past context_length 24
    idx, mask = pad_left(PROMPTS, pad_id=0)
    batched = generate(model, idx, 10, temperature=0, attention_mask=mask)
    for row, prompt in zip(batched, PROMPTS):
        assert row[-10:].tolist() == naive_greedy(model, prompt, 10)
    streamed = torch.stack(list(generate_stream(model, idx, 10, temperature=0, attention_mask=mask)), dim=1)
    assert torch.equal(streamed, batched[:, -10:])


def test_scoring_follows_the_contract(model):
    ids = torch.randint(0, 50257, (20,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logprobs = model(ids[None])[0].double().log_softmax(-1)
    expected = logprobs[:-1].gather(-1, ids[1:, None]).squeeze(-1)
    ours = torch.cat(list(token_logprobs(model, ids)))
    assert torch.allclose(ours, expected, atol=1e-5)
    assert math.isclose(perplexity(model, ids).perplexity, math.exp(-expected.mean().item()), rel_tol=1e-5)


def test_serving_follows_the_contract(model):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient
    from tokenizers import Tokenizer

    from minhub.serve import create_app

    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    texts = ["The cat", "A", "Hello there my friend"]
    app = create_app(model, tokenizer, "tiny", max_batch=3)
    with TestClient(app) as http, concurrent.futures.ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda text: http.post("/v1/completions", json={
            "model": "tiny", "prompt": text, "max_tokens": 8, "temperature": 0}).json(), texts))
    for text, response in zip(texts, responses):
        expected = naive_greedy(model, tokenizer.encode(text).ids, 8)
        assert response["choices"][0]["text"] == tokenizer.decode(expected)


def test_the_speed_path_follows_the_contract(model, monkeypatch):
    import copy

    fast = speed.optimize(copy.deepcopy(model))
    if matmul.plan_for(torch.float32, "cpu") is not None:
        assert all(type(m) is matmul.CPULinear for m in fast.modules() if isinstance(m, nn.Linear))
    assert generate(fast, torch.tensor([PROMPTS[0]]), 12, temperature=0)[0, 3:].tolist() == \
        naive_greedy(model, PROMPTS[0], 12)
    int8 = speed.optimize(copy.deepcopy(model), weights="int8")
    assert not any(type(m) is nn.Linear for m in int8.modules())
    assert generate(int8, torch.tensor([PROMPTS[0]]), 4, temperature=0).shape == (1, 7)
    if not hardware.cpu_info().can_compile:
        pytest.skip(f"the precompiled step needs a C++ compiler; {hardware.cpu_info().describe()}")
    monkeypatch.setenv("MINHUB_DECODE", "compiled")  # this model is far below the size it is built for by default
    with torch.inference_mode():
        fast.setup_cache(1, fast.config.context_length + 1)
        assert speed.decode_step(fast, 1, masked=False) is not fast  # the package was built for this class
    assert generate(fast, torch.tensor([PROMPTS[2]]), 12, temperature=0)[0, 5:].tolist() == \
        naive_greedy(model, PROMPTS[2], 12)
