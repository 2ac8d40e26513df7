"""minhub/gpt_bigcode.py against transformers' own GPTBigCodeForCausalLM, on tiny random checkpoints that
save_pretrained writes to a temporary directory: logits for multi-query and multi-head attention, tied and untied
heads, sharded bf16 files, pytorch_model.bin, the KV cache, padded batches, greedy decoding and the errors."""

import json

import pytest
import torch

from minhub.gpt_bigcode import GPTBigCode, GPTBigCodeConfig, generate, gpt_bigcode_from_pretrained

TOL = 1e-4  # max |Δlogit| in fp32
V = 151
BASE = dict(vocab_size=V, n_embd=48, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)

CASES = {
    "mqa": {},  # every BigCode checkpoint: multi_query, tied head, gelu_pytorch_tanh
    "mha": dict(multi_query=False),  # c_attn's per-head [q k v] layout
    "mqa-untied": dict(tie_word_embeddings=False),
    "mha-untied": dict(multi_query=False, tie_word_embeddings=False),
    "gelu-n_inner": dict(activation_function="gelu", n_inner=72),
    "relu-unscaled": dict(activation_function="relu", scale_attn_weights=False),
    "gelu_new-eps": dict(activation_function="gelu_new", layer_norm_epsilon=0.5),  # a large eps must be read
}


def hf_model(seed: int = 0, std: float = 0.2, **config):
    """A transformers model with random weights spread wider than its init (so a mismapped weight, bias or LayerNorm
    changes the output), LayerNorm gains near 1 but not exactly, nonzero biases; eager attention, not SDPA."""
    from transformers import GPTBigCodeConfig as HFConfig, GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM(HFConfig(**{**BASE, **config}, attn_implementation="eager"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith("weight") and name.split(".")[-2].startswith("ln_")
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if gain else 0.0))
    return model.eval()


def hf_logits(ref, idx, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return ref(idx, **kwargs).logits


def saved(ref, directory, **kwargs):
    ref.save_pretrained(directory, **kwargs)
    return directory


@pytest.fixture(scope="module", params=["mqa", "mha"])
def pair(request, tmp_path_factory):
    """A checkpoint shared by the cache, padding and generation tests: (transformers model, ours)."""
    ref = hf_model(seed=7, **CASES[request.param])
    return ref, gpt_bigcode_from_pretrained(saved(ref, tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    ref = hf_model(seed=len(case), **CASES[case])
    model = gpt_bigcode_from_pretrained(saved(ref, tmp_path))
    config = model.config
    assert config.context_length == 64 and (config.bos_token_id, config.eos_token_id) == (0, 1)
    assert (model.lm_head.weight is model.transformer.wte.weight) == config.tie_word_embeddings
    assert (ref.lm_head.weight is ref.transformer.wte.weight) == config.tie_word_embeddings  # transformers agrees
    idx = torch.randint(0, V, (2, 33))
    with torch.no_grad():
        diff = (model(idx) - hf_logits(ref, idx)).abs().max().item()
    assert diff <= TOL, f"max |Δlogit| = {diff}"


def test_a_sharded_bf16_checkpoint_loads_in_float32(tmp_path):
    from transformers import GPTBigCodeForCausalLM

    saved(hf_model(seed=5).to(torch.bfloat16), tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert not (tmp_path / "model.safetensors").exists() and len(set(index["weight_map"].values())) > 2
    model = gpt_bigcode_from_pretrained(tmp_path)
    assert model.lm_head.weight.dtype == torch.float32
    ref32 = GPTBigCodeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    idx = torch.randint(0, V, (2, 24))
    expected = hf_logits(ref32, idx)
    with torch.no_grad():
        assert (model(idx) - expected).abs().max().item() <= TOL
    # in bf16, transformers' SDPA attention rounds as ours does (a bf16 step of a logit near 5 is 0.03); its eager
    # attention rounds elsewhere: ours is within twice its distance from the fp32 logits
    ours16 = gpt_bigcode_from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert ours16.lm_head.weight is ours16.transformer.wte.weight
    with torch.no_grad():
        logits = ours16(idx)
    assert logits.dtype == torch.bfloat16
    sdpa16 = GPTBigCodeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    assert (logits.float() - hf_logits(sdpa16, idx).float()).abs().max().item() <= 0.05
    eager16 = GPTBigCodeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    their_error = (hf_logits(eager16, idx).float() - expected).abs().max().item()
    assert 0 < (logits.float() - expected).abs().max().item() <= 2 * their_error


def test_pytorch_model_bin_with_mask_buffers_and_no_lm_head(tmp_path):
    from safetensors.torch import load_file

    ref = hf_model(seed=9, multi_query=False)
    saved(ref, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in state  # tied: save_pretrained leaves it out
    for i in range(BASE["n_layer"]):  # causal masks as older files stored them, wrong on purpose
        state[f"transformer.h.{i}.attn.bias"] = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(7.0)
    state["transformer.bias"] = torch.zeros(64, 64, dtype=torch.bool)  # the model-level mask, as transformers names it
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    idx = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        assert (gpt_bigcode_from_pretrained(tmp_path)(idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_a_base_model_checkpoint_without_the_transformer_prefix(tmp_path):
    ref = hf_model(seed=13)
    from safetensors.torch import load_file

    saved(ref.transformer, tmp_path)  # GPTBigCodeModel: wte.weight, h.0..., no lm_head
    assert "wte.weight" in load_file(tmp_path / "model.safetensors")
    idx = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        assert (gpt_bigcode_from_pretrained(tmp_path)(idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_prefill_then_steps_through_the_cache_match_a_full_forward(pair):
    ref, model = pair
    idx = torch.randint(0, V, (2, 20))
    expected = hf_logits(ref, idx)
    n_kv = 1 if model.config.multi_query else 4
    with torch.inference_mode():
        model.setup_cache(3, max_len=32)  # more rows than used: a forward of B rows uses the first B
        caches = model.kv_caches()
        assert len(caches) == 2 and caches[0].k.shape == (3, n_kv, 32, 12)  # multi-query: one head cached
        chunks = [model(idx[:, :10], 0), model(idx[:, 10:13], 10)]  # the prompt, then a chunk of three
        chunks += [model(idx[:, t:t + 1], t) for t in range(13, 20)]  # then one token at a time
        model.setup_cache(3, max_len=32)
        assert model.kv_caches()[0] is caches[0] and model.cache_len == 32  # unchanged: reused
        last = model(idx[:, :20], 0, only_last=True)
    assert (torch.cat(chunks, dim=1) - expected).abs().max().item() <= TOL
    assert last.shape == (2, 1, V) and (last[:, 0] - expected[:, -1]).abs().max().item() <= TOL
    with torch.inference_mode():  # the same keys transformers caches (one head for multi-query)
        past = ref(idx[:, :10], use_cache=True).past_key_values
        model.setup_cache(2, max_len=16)
        model(idx[:, :10], 0)
    for layer, cache in enumerate(model.kv_caches()):
        assert (cache.k[:, :, :10] - past.layers[layer].keys).abs().max().item() <= 1e-5
        assert (cache.v[:, :, :10] - past.layers[layer].values).abs().max().item() <= 1e-5


def test_greedy_generation_equals_transformers(pair):
    ref, model = pair
    prompt = torch.randint(2, V, (2, 8))
    ours = generate(model, prompt, 16, temperature=0)
    with torch.no_grad():
        theirs = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_generation_slides_past_the_context_window(pair):
    ref, model = pair
    idx = torch.randint(2, V, (1, 60))
    ours = generate(model, idx, 8, temperature=0)
    for _ in range(8):  # each token from the last 64, re-numbered from position 0: a full forward each time
        idx = torch.cat((idx, hf_logits(ref, idx[:, -64:])[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(ours, idx)


def test_sampling_keeps_to_the_top_k(pair):
    ref, model = pair
    prompt = torch.randint(2, V, (2, 5))
    top2 = hf_logits(ref, prompt)[:, -1].topk(2).indices
    for seed in range(5):
        out = generate(model, prompt, 1, top_k=2, generator=torch.Generator().manual_seed(seed))
        assert all(out[b, -1] in top2[b] for b in range(2))


def left_padded(lengths, T):
    rows = [torch.randint(2, V, (n,)) for n in lengths]
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        idx[b, T - len(row):], mask[b, T - len(row):] = row, 1
    return rows, idx, mask


def test_a_left_padded_batch_computes_what_each_row_does_alone(pair):
    ref, model = pair
    rows, idx, mask = left_padded([12, 7, 3], 12)
    with torch.no_grad():
        logits = model(idx, attention_mask=mask)
    assert not logits.isnan().any()
    for b, row in enumerate(rows):
        alone = hf_logits(ref, row[None])[0]
        assert (logits[b, 12 - len(row):] - alone).abs().max().item() <= TOL
    # a padding slot sees only itself, at position 0: the pad token alone (in PyTorch's SDPA a query with every key
    # hidden gives zeros, on other backends NaN)
    pad_alone = hf_logits(ref, torch.zeros(1, 1, dtype=torch.long))[0, 0]
    assert (logits[:, :9][mask[:, :9] == 0] - pad_alone).abs().max().item() <= TOL
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers' own padded batch, real positions only
    theirs = hf_logits(ref, idx, attention_mask=mask, position_ids=position_ids)
    assert ((logits - theirs).abs().amax(-1) * mask).max().item() <= TOL


def test_a_row_with_a_hole_counts_only_its_real_tokens(pair):
    ref, model = pair
    row = torch.randint(2, V, (9,))
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1], [1] * 9])
    with torch.no_grad():
        logits = model(torch.stack((row, row)), attention_mask=mask)
    real = mask[0].bool()
    assert (logits[0, real] - hf_logits(ref, row[real][None])[0]).abs().max().item() <= TOL
    assert (logits[1] - hf_logits(ref, row[None])[0]).abs().max().item() <= TOL


def test_cached_decoding_of_a_left_padded_batch(pair):
    ref, model = pair
    rows, idx, mask = left_padded([9, 4], 9)
    steps = torch.randint(2, V, (2, 5))
    model.setup_cache(2, max_len=20)
    with torch.inference_mode():
        outs = [model(idx, 0, mask)[:, -1]]
        for t in range(5):
            mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
            outs.append(model(steps[:, t:t + 1], 9 + t, mask)[:, -1])
    for b, row in enumerate(rows):
        alone = hf_logits(ref, torch.cat((row, steps[b]))[None])[0, len(row) - 1:]  # (6, V): the same predictions
        assert (torch.stack([o[b] for o in outs]) - alone).abs().max().item() <= TOL


def test_refused_configs():
    with pytest.raises(ValueError, match=r"'gpt2' checkpoint, not GPT-BigCode"):
        GPTBigCodeConfig.from_dict({**BASE, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="add_cross_attention"):
        GPTBigCodeConfig.from_dict({**BASE, "model_type": "gpt_bigcode", "add_cross_attention": True})
    with pytest.raises(ValueError, match="activation_function='swiglu' is not implemented"):
        GPTBigCodeConfig.from_dict({**BASE, "model_type": "gpt_bigcode", "activation_function": "swiglu"})
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTBigCodeConfig(**{**BASE, "n_head": 5})


def test_a_wrong_model_type_fails_before_reading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' checkpoint"):
        gpt_bigcode_from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "gpt_bigcode"}))
    with pytest.raises(FileNotFoundError, match="holds none of model.safetensors"):
        gpt_bigcode_from_pretrained(tmp_path)


def test_past_the_context_window_and_the_cache_are_errors(pair):
    _, model = pair
    with torch.no_grad():
        with pytest.raises(ValueError, match="n_positions=64"):
            model(torch.zeros(1, 65, dtype=torch.long))
        model.setup_cache(1, max_len=16)
        with pytest.raises(ValueError, match="holds 16 slots"):
            model(torch.zeros(1, 4, dtype=torch.long), 14)
        with pytest.raises(ValueError, match="n_positions=64"):
            model(torch.zeros(1, 4, dtype=torch.long), 62)


def test_a_model_built_from_scratch_is_initialised_and_trains():
    model = GPTBigCode(GPTBigCodeConfig(**{**BASE, "initializer_range": 0.05}))
    attn = model.transformer.h[0].attn
    assert attn.c_attn.weight.shape == (48 + 2 * 12, 48)  # multi-query: all queries, one key, one value
    assert abs(attn.c_attn.weight.std().item() - 0.05) < 0.01 and not attn.c_attn.bias.any()
    assert abs(attn.c_proj.weight.std().item() - 0.05 / 2) < 0.005  # / sqrt(2 * n_layer)
    assert bool((model.transformer.ln_f.weight == 1).all()) and model.lm_head.weight is model.transformer.wte.weight
    untied = GPTBigCode(GPTBigCodeConfig(**{**BASE, "tie_word_embeddings": False}))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    idx = torch.randint(0, V, (2, 16))
    model.train()
    loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_file_works_copied_alone(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    shutil.copy(Path(__file__).parents[1] / "minhub" / "gpt_bigcode.py", tmp_path / "gpt_bigcode.py")
    script = (
        "import sys, torch, gpt_bigcode as g\n"
        "model = g.GPTBigCode(g.GPTBigCodeConfig(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=8))\n"
        "assert g.generate(model, torch.zeros(1, 6, dtype=torch.long), 4).shape == (1, 10)\n"
        "print(sorted(m for m in ('minhub', 'transformers', 'huggingface_hub', 'safetensors') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # the hub's libraries are imported only inside gpt_bigcode_from_pretrained
