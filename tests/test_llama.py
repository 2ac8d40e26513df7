"""minhub/llama.py against transformers' own Llama, Qwen2 and Mistral classes, on tiny random checkpoints that
save_pretrained writes to a temporary directory: logits, both config.json layouts, sharded bf16 files, the KV cache,
padded batches, greedy decoding and the errors for what llama.py does not implement."""

import json

import pytest
import torch

from minhub.llama import Llama, LlamaConfig, generate, llama_from_pretrained

TOL = 1e-4  # max |Δlogit| in fp32
BASE = dict(vocab_size=151, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=1)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 0.5,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # head_dim 12: kept, smoothed, divided

CASES = {
    "gqa": ("llama", {}),
    "mqa": ("llama", dict(num_key_value_heads=1)),
    "mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "head-dim": ("llama", dict(head_dim=16)),  # not hidden_size / num_attention_heads = 12
    "llama3-rope": ("llama", dict(rope_parameters=LLAMA3)),
    "linear-rope": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0})),
    "attention-bias": ("llama", dict(attention_bias=True)),
    "mlp-bias-tied": ("llama", dict(mlp_bias=True, tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral-window": ("mistral", dict(sliding_window=40)),  # larger than every sequence of these tests
}


def hf_model(family: str = "llama", seed: int = 0, std: float = 0.2, **config):
    """A transformers model with random weights spread wider than its init (so a mismapped weight, bias or norm
    changes the output), RMSNorm gains near 1 but not exactly; eager attention, independent of SDPA."""
    import transformers

    name = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[family]
    config_cls, model_cls = getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")
    model = model_cls(config_cls(**{**BASE, **config}, attn_implementation="eager"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if name.endswith("norm.weight") else 0.0))
    return model.eval()


def hf_logits(ref, idx, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return ref(idx, **kwargs).logits


def saved(ref, directory, **kwargs):
    ref.save_pretrained(directory, **kwargs)
    return directory


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """One GQA checkpoint shared by the cache, padding and generation tests: (transformers model, ours)."""
    ref = hf_model(seed=7)
    return ref, llama_from_pretrained(saved(ref, tmp_path_factory.mktemp("gqa")))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    family, config = CASES[case]
    ref = hf_model(family, seed=len(case), **config)
    model = llama_from_pretrained(saved(ref, tmp_path))
    window = config.get("sliding_window") or 64  # Mistral's window, where shorter, is its context
    assert model.config.model_type == family and model.config.context_length == min(64, window)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    idx = torch.randint(0, BASE["vocab_size"], (2, 33))
    with torch.no_grad():
        diff = (model(idx) - hf_logits(ref, idx)).abs().max().item()
    assert diff <= TOL, f"max |Δlogit| = {diff}"


OLD_LAYOUTS = {  # config.json as written before transformers 5: top-level rope_theta, rope_scaling with "type"
    "default": ({"rope_type": "default", "rope_theta": 5000.0}, {"rope_theta": 5000.0, "rope_scaling": None}),
    "linear": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
               {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}),
    "llama3": (LLAMA3, {"rope_theta": LLAMA3["rope_theta"],
                        "rope_scaling": {k: v for k, v in LLAMA3.items() if k != "rope_theta"}}),
    "no-theta": ({"rope_type": "default", "rope_theta": 10000.0}, {}),  # both absent: theta 10000
}


@pytest.mark.parametrize("layout", OLD_LAYOUTS)
def test_the_older_rope_keys_are_read(layout, tmp_path):
    rope_parameters, old_keys = OLD_LAYOUTS[layout]
    ref = hf_model(seed=3, rope_parameters=rope_parameters)
    saved(ref, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in config  # what transformers 5 writes, replaced here by the older keys
    del config["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps({**config, **old_keys}))
    model = llama_from_pretrained(tmp_path)
    idx = torch.randint(0, BASE["vocab_size"], (2, 40))
    with torch.no_grad():
        assert (model(idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_a_sharded_bf16_checkpoint_loads_in_float32(tmp_path):
    from transformers import LlamaForCausalLM

    ref = hf_model(seed=5, tie_word_embeddings=True).to(torch.bfloat16)
    saved(ref, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert not (tmp_path / "model.safetensors").exists() and len(set(index["weight_map"].values())) > 2
    model = llama_from_pretrained(tmp_path)
    assert model.lm_head.weight.dtype == torch.float32
    ref32 = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    idx = torch.randint(0, BASE["vocab_size"], (2, 24))
    with torch.no_grad():
        assert (model(idx) - hf_logits(ref32, idx)).abs().max().item() <= TOL
    # in bf16, transformers' SDPA attention rounds as ours does (RMSNorm cast back before the gain, cos and sin cast to
    # bf16 before the rotation): one bf16 step of a logit near 6 is 0.03, where its eager attention differs by 0.15+
    ours16 = llama_from_pretrained(tmp_path, dtype=torch.bfloat16)
    ref16 = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    with torch.no_grad():
        logits = ours16(idx)
    assert logits.dtype == torch.bfloat16 and ours16.lm_head.weight is ours16.model.embed_tokens.weight
    assert (logits.float() - hf_logits(ref16, idx).float()).abs().max().item() <= 0.05


def test_stored_rotary_buffers_of_old_checkpoints_are_ignored(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = hf_model(seed=11)
    saved(ref, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for i in range(BASE["num_hidden_layers"]):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(6)  # wrong on purpose
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    idx = torch.randint(0, BASE["vocab_size"], (1, 20))
    with torch.no_grad():
        assert (llama_from_pretrained(tmp_path)(idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


@pytest.mark.parametrize("case", ["gqa", "qwen2", "mistral-window"])
def test_prefill_then_steps_through_the_cache_match_a_full_forward(case, tmp_path):
    family, config = CASES[case]
    ref = hf_model(family, seed=2, **config)
    model = llama_from_pretrained(saved(ref, tmp_path))
    idx = torch.randint(0, BASE["vocab_size"], (2, 20))
    expected = hf_logits(ref, idx)
    with torch.inference_mode():
        model.setup_cache(3, max_len=32)  # more rows than used: a forward of B rows uses the first B
        caches = model.kv_caches()
        assert len(caches) == 2 and caches[0].k.shape == (3, model.config.num_key_value_heads, 32, 12)
        chunks = [model(idx[:, :10], 0), model(idx[:, 10:13], 10)]  # the prompt, then a chunk of three
        chunks += [model(idx[:, t:t + 1], t) for t in range(13, 20)]  # then one token at a time
        model.setup_cache(3, max_len=32)
        assert model.kv_caches()[0] is caches[0]  # same shape, dtype, device and mode: reused
        last = model(idx[:, :20], 0, only_last=True)
    assert (torch.cat(chunks, dim=1) - expected).abs().max().item() <= TOL
    assert last.shape == (2, 1, BASE["vocab_size"]) and (last[:, 0] - expected[:, -1]).abs().max().item() <= TOL


def test_greedy_generation_equals_transformers(gqa):
    ref, model = gqa
    prompt = torch.randint(2, BASE["vocab_size"], (2, 8))
    ours = generate(model, prompt, 16, temperature=0)
    with torch.no_grad():
        theirs = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_generation_slides_past_the_context_window(gqa):
    ref, model = gqa
    idx = torch.randint(2, BASE["vocab_size"], (1, 60))
    ours = generate(model, idx, 8, temperature=0)
    for _ in range(8):  # each token from the last 64, re-numbered from position 0: a full forward each time
        idx = torch.cat((idx, hf_logits(ref, idx[:, -64:])[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(ours, idx)


def test_sampling_keeps_to_the_top_k(gqa):
    _, model = gqa
    prompt = torch.randint(2, BASE["vocab_size"], (2, 5))
    with torch.no_grad():
        top2 = model(prompt)[:, -1].topk(2).indices
    for seed in range(5):
        out = generate(model, prompt, 1, top_k=2, generator=torch.Generator().manual_seed(seed))
        assert all(out[b, -1] in top2[b] for b in range(2))


def left_padded(lengths, T):
    rows = [torch.randint(2, BASE["vocab_size"], (n,)) for n in lengths]
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        idx[b, T - len(row):], mask[b, T - len(row):] = row, 1
    return rows, idx, mask


def test_a_left_padded_batch_computes_what_each_row_does_alone(gqa):
    ref, model = gqa
    rows, idx, mask = left_padded([12, 7, 3], 12)
    with torch.no_grad():
        logits = model(idx, attention_mask=mask)
    assert not logits.isnan().any()
    for b, row in enumerate(rows):
        alone = hf_logits(ref, row[None])[0]
        assert (logits[b, 12 - len(row):] - alone).abs().max().item() <= TOL
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers' own padded batch, real positions only
    theirs = hf_logits(ref, idx, attention_mask=mask, position_ids=position_ids)
    assert ((logits - theirs).abs().amax(-1) * mask).max().item() <= TOL


def test_a_row_with_a_hole_counts_only_its_real_tokens(gqa):
    ref, model = gqa  # RoPE sees only position differences: left padding alone would not tell positions apart
    row = torch.randint(2, BASE["vocab_size"], (9,))
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1], [1] * 9])
    with torch.no_grad():
        logits = model(torch.stack((row, row)), attention_mask=mask)
    real = mask[0].bool()
    assert (logits[0, real] - hf_logits(ref, row[real][None])[0]).abs().max().item() <= TOL
    assert (logits[1] - hf_logits(ref, row[None])[0]).abs().max().item() <= TOL


def test_cached_decoding_of_a_left_padded_batch(gqa):
    ref, model = gqa
    rows, idx, mask = left_padded([9, 4], 9)
    steps = torch.randint(2, BASE["vocab_size"], (2, 5))
    model.setup_cache(2, max_len=20)
    with torch.inference_mode():
        outs = [model(idx, 0, mask)[:, -1]]
        for t in range(5):
            mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
            outs.append(model(steps[:, t:t + 1], 9 + t, mask)[:, -1])
    for b, row in enumerate(rows):
        alone = hf_logits(ref, torch.cat((row, steps[b]))[None])[0, len(row) - 1:]  # (6, V): the same predictions
        assert (torch.stack([o[b] for o in outs]) - alone).abs().max().item() <= TOL


def test_refused_model_types_and_rope_types():
    with pytest.raises(ValueError, match=r"'gemma'.*'llama', 'qwen2', 'mistral'"):
        LlamaConfig.from_dict({**BASE, "model_type": "gemma"})
    for rope in ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, {"rope_scaling": {"type": "dynamic"}}):
        with pytest.raises(ValueError, match=r"not implemented; supported: \['default', 'linear', 'llama3'\]"):
            LlamaConfig.from_dict({**BASE, "model_type": "llama", **rope})
    with pytest.raises(ValueError, match="use_sliding_window"):
        LlamaConfig.from_dict({**BASE, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8})
    config = LlamaConfig.from_dict({**BASE, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 8})
    Llama(config)(torch.zeros(1, 9, dtype=torch.long))  # Qwen2's window is unused while use_sliding_window is false


def test_an_unknown_model_type_fails_before_reading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' checkpoint"):
        llama_from_pretrained(tmp_path)


def test_past_mistrals_sliding_window_is_an_error(tmp_path):
    ref = hf_model("mistral", sliding_window=8)
    model = llama_from_pretrained(saved(ref, tmp_path))
    idx = torch.randint(0, BASE["vocab_size"], (1, 9))
    with torch.no_grad():  # up to the window, every key is in it: the same as transformers
        assert (model(idx[:, :8]) - hf_logits(ref, idx[:, :8])).abs().max().item() <= TOL
        with pytest.raises(ValueError, match="context window of 8 \\(Mistral's sliding_window"):
            model(idx)
        model.setup_cache(1)
        model(idx[:, :6], 0)
        with pytest.raises(ValueError, match="context window of 8 \\(Mistral's sliding_window"):
            model(idx[:, 6:9], 6)


def test_past_the_context_window_and_the_cache_are_errors(gqa):
    _, model = gqa
    with torch.no_grad():
        with pytest.raises(ValueError, match="context window of 64: keep the last tokens"):
            model(torch.zeros(1, 65, dtype=torch.long))
        model.setup_cache(1, max_len=16)
        with pytest.raises(ValueError, match="holds 16 slots"):
            model(torch.zeros(1, 4, dtype=torch.long), 14)


def test_a_model_built_from_scratch_is_initialised_and_trains():
    config = LlamaConfig(**{**BASE, "attention_bias": True, "initializer_range": 0.05, "tie_word_embeddings": True})
    model = Llama(config)
    w, b = model.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.bias
    assert abs(w.std().item() - 0.05) < 0.01 and not b.any() and bool((model.model.norm.weight == 1).all())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    idx = torch.randint(0, BASE["vocab_size"], (2, 16))
    loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_file_works_copied_alone(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    shutil.copy(Path(__file__).parents[1] / "minhub" / "llama.py", tmp_path / "llama.py")
    script = (
        "import sys, torch, llama\n"
        "model = llama.Llama(llama.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, "
        "num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8))\n"
        "assert llama.generate(model, torch.zeros(1, 6, dtype=torch.long), 4).shape == (1, 10)\n"
        "print(sorted(m for m in ('minhub', 'transformers', 'huggingface_hub', 'safetensors') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # the hub's libraries are imported only inside llama_from_pretrained
