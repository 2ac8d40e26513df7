"""minhub/gpt_neox.py against transformers' own GPTNeoXForCausalLM, on tiny random checkpoints that save_pretrained
writes to a temporary directory: logits (parallel and sequential residual, partial and full rotary, tied and untied
heads), both config.json layouts, sharded bf16 files, pytorch_model.bin files, the KV cache, padded batches, greedy
decoding and the errors for what gpt_neox.py does not implement."""

import json

import pytest
import torch

from helpers import put_in_hub_cache
from minhub.gpt_neox import GPTNeoX, GPTNeoXConfig, generate, gpt_neox_from_pretrained

TOL = 1e-4  # max |Δlogit| in fp32
BASE = dict(vocab_size=151, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, layer_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0,
            eos_token_id=1)  # head size 16: the default rotary_pct 0.25 turns 4 of its channels


def rope(pct: float = 0.25, theta: float = 10000.0) -> dict:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": pct}}


CASES = {
    "parallel": {},
    "sequential": dict(use_parallel_residual=False),
    "full-rotary": rope(1.0),
    "half-rotary-theta": rope(0.5, 500.0),
    "tied": dict(tie_word_embeddings=True),
    "sequential-tied-full-rotary": dict(use_parallel_residual=False, tie_word_embeddings=True, **rope(1.0)),
    "odd-rotary": dict(hidden_size=48),  # head size 12: int(12 * 0.25) = 3 rotary channels, which turn 4
    "gelu-new": dict(hidden_act="gelu_new"),
    "gelu-fast": dict(hidden_act="gelu_fast"),
    "no-attention-bias": dict(attention_bias=False),
    "layer-norm-eps": dict(layer_norm_eps=0.05),  # large enough that a misread eps moves the logits
}


def hf_model(seed: int = 0, std: float = 0.2, **config):
    """A transformers model with random weights spread wider than its init (so a mismapped weight, bias or norm
    changes the output), LayerNorm gains near 1 but not exactly; eager attention, independent of SDPA."""
    from transformers import GPTNeoXConfig as HFConfig
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(HFConfig(**{**BASE, **config}, attn_implementation="eager"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith(("layernorm.weight", "layer_norm.weight"))
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if gain else 0.0))
    return model.eval()


def hf_logits(ref, idx, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return ref(idx, **kwargs).logits


def saved(ref, directory, **kwargs):
    ref.save_pretrained(directory, **kwargs)
    return directory


def max_diff(model, ref, idx) -> float:
    with torch.no_grad():
        return (model(idx) - hf_logits(ref, idx)).abs().max().item()


@pytest.fixture(scope="module")
def pythia(tmp_path_factory):
    """One checkpoint shared by the cache, padding and generation tests: (transformers model, ours)."""
    ref = hf_model(seed=7)
    return ref, gpt_neox_from_pretrained(saved(ref, tmp_path_factory.mktemp("pythia")))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    ref = hf_model(seed=len(case), **CASES[case])
    model = gpt_neox_from_pretrained(saved(ref, tmp_path))
    assert model.config.context_length == 64 and model.config.vocab_size == BASE["vocab_size"]
    tied = model.embed_out.weight is model.gpt_neox.embed_in.weight
    assert tied == CASES[case].get("tie_word_embeddings", False)
    assert max_diff(model, ref, torch.randint(0, BASE["vocab_size"], (2, 33))) <= TOL


OLD_LAYOUTS = {  # config.json as written before transformers 5: top-level rotary_pct and rotary_emb_base
    "pct-and-base": (rope(0.5, 500.0), {"rotary_pct": 0.5, "rotary_emb_base": 500, "rope_scaling": None}),
    "full-rotary": (rope(1.0, 10000.0), {"rotary_pct": 1.0, "rotary_emb_base": 10000}),
    "neither": (rope(0.25, 10000.0), {}),  # both absent: a quarter of each head, theta 10000
}


@pytest.mark.parametrize("layout", OLD_LAYOUTS)
def test_the_older_rotary_keys_are_read(layout, tmp_path):
    new_keys, old_keys = OLD_LAYOUTS[layout]
    ref = hf_model(seed=3, **new_keys)
    saved(ref, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in config  # what transformers 5 writes, replaced here by the older keys
    del config["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps({**config, **old_keys}))
    model = gpt_neox_from_pretrained(tmp_path)
    assert max_diff(model, ref, torch.randint(0, BASE["vocab_size"], (2, 40))) <= TOL


def test_a_sharded_bf16_checkpoint_loads_in_float32(tmp_path):
    from transformers import GPTNeoXForCausalLM

    ref = hf_model(seed=5).to(torch.bfloat16)
    saved(ref, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert not (tmp_path / "model.safetensors").exists() and len(set(index["weight_map"].values())) > 2
    model = gpt_neox_from_pretrained(tmp_path)
    assert model.embed_out.weight.dtype == torch.float32
    ref32 = GPTNeoXForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    idx = torch.randint(0, BASE["vocab_size"], (2, 24))
    assert max_diff(model, ref32, idx) <= TOL
    # in bf16, ours rounds as transformers' SDPA attention does (cos and sin cast to bf16 before the rotation, sums in
    # its order): one bf16 step of a logit near 6 is 0.03, where its eager attention or float32 weights differ by 0.05
    ours16 = gpt_neox_from_pretrained(tmp_path, dtype=torch.bfloat16)
    ref16 = GPTNeoXForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    with torch.no_grad():
        logits = ours16(idx)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - hf_logits(ref16, idx).float()).abs().max().item() <= 0.032


@pytest.mark.parametrize("sharded", [False, True])
def test_a_pytorch_model_bin_checkpoint_with_stored_buffers_loads(sharded, tmp_path):
    from safetensors.torch import load_file

    ref = hf_model(seed=11, use_parallel_residual=False)
    saved(ref, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()  # transformers 5 writes safetensors only: convert by hand
    for i in range(BASE["num_hidden_layers"]):  # buffers older checkpoints stored, wrong on purpose
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool)
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    if not sharded:
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        names = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for file, keys in shards.items():
            torch.save({k: state[k] for k in keys}, tmp_path / file)
        weight_map = {k: file for file, keys in shards.items() for k in keys}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = gpt_neox_from_pretrained(tmp_path)
    assert max_diff(model, ref, torch.randint(0, BASE["vocab_size"], (2, 20))) <= TOL


def test_a_hub_repo_of_bin_files_loads_by_its_id(tmp_path):
    from safetensors.torch import load_file

    ref = hf_model(seed=13)  # as an old Pythia revision: config.json and pytorch_model.bin, no safetensors
    saved(ref, tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    files = {name: tmp_path / name for name in ("config.json", "pytorch_model.bin")}
    commit = put_in_hub_cache("minhub-tests/pythia-bin", files)  # offline: the cache says which files exist
    for revision in (None, commit):
        model = gpt_neox_from_pretrained("minhub-tests/pythia-bin", revision)
        assert max_diff(model, ref, torch.randint(0, BASE["vocab_size"], (1, 12))) <= TOL


@pytest.mark.parametrize("case", ["parallel", "sequential-tied-full-rotary"])
def test_prefill_then_steps_through_the_cache_match_a_full_forward(case, tmp_path):
    ref = hf_model(seed=2, **CASES[case])
    model = gpt_neox_from_pretrained(saved(ref, tmp_path))
    idx = torch.randint(0, BASE["vocab_size"], (2, 20))
    expected = hf_logits(ref, idx)
    with torch.inference_mode():
        model.setup_cache(3, max_len=32)  # more rows than used: a forward of B rows uses the first B
        caches = model.kv_caches()
        assert len(caches) == 2 and caches[0].k.shape == (3, 4, 32, 16) and model.cache_len == 32
        chunks = [model(idx[:, :10], 0), model(idx[:, 10:13], 10)]  # the prompt, then a chunk of three
        chunks += [model(idx[:, t:t + 1], t) for t in range(13, 20)]  # then one token at a time
        model.setup_cache(3, max_len=32)
        assert model.kv_caches()[0] is caches[0]  # same shape, dtype, device and mode: reused
        last = model(idx[:, :20], 0, only_last=True)
    assert (torch.cat(chunks, dim=1) - expected).abs().max().item() <= TOL
    assert last.shape == (2, 1, BASE["vocab_size"]) and (last[:, 0] - expected[:, -1]).abs().max().item() <= TOL


def test_greedy_generation_equals_transformers(pythia):
    ref, model = pythia
    prompt = torch.randint(2, BASE["vocab_size"], (2, 8))
    ours = generate(model, prompt, 16, temperature=0)
    with torch.no_grad():
        theirs = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_generation_slides_past_the_context_window(pythia):
    ref, model = pythia
    idx = torch.randint(2, BASE["vocab_size"], (1, 60))
    ours = generate(model, idx, 8, temperature=0)
    for _ in range(8):  # each token from the last 64, re-numbered from position 0: a full forward each time
        idx = torch.cat((idx, hf_logits(ref, idx[:, -64:])[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(ours, idx)


def test_sampling_keeps_to_the_top_k(pythia):
    _, model = pythia
    prompt = torch.randint(2, BASE["vocab_size"], (2, 5))
    with torch.no_grad():
        top2 = model(prompt)[:, -1].topk(2).indices
    seen = [set(), set()]
    for seed in range(12):  # at a high temperature the two are about equally likely: both come up
        out = generate(model, prompt, 1, temperature=50.0, top_k=2, generator=torch.Generator().manual_seed(seed))
        for b in range(2):
            seen[b].add(out[b, -1].item())
    assert seen == [set(top2[0].tolist()), set(top2[1].tolist())]


def left_padded(lengths, T):
    rows = [torch.randint(2, BASE["vocab_size"], (n,)) for n in lengths]
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        idx[b, T - len(row):], mask[b, T - len(row):] = row, 1
    return rows, idx, mask


def test_a_left_padded_batch_computes_what_each_row_does_alone(pythia):
    ref, model = pythia
    rows, idx, mask = left_padded([12, 7, 3], 12)
    with torch.no_grad():
        logits = model(idx, attention_mask=mask)
    assert not logits.isnan().any()
    for b, row in enumerate(rows):
        alone = hf_logits(ref, row[None])[0]
        assert (logits[b, 12 - len(row):] - alone).abs().max().item() <= TOL
    for b, j in (~mask.bool()).nonzero().tolist():  # a padding slot sees only itself: its token alone
        assert (logits[b, j] - hf_logits(ref, idx[b, j].view(1, 1))[0, 0]).abs().max().item() <= TOL
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers' own padded batch, real positions only
    theirs = hf_logits(ref, idx, attention_mask=mask, position_ids=position_ids)
    assert ((logits - theirs).abs().amax(-1) * mask).max().item() <= TOL


def test_a_row_with_a_hole_counts_only_its_real_tokens(pythia):
    ref, model = pythia  # rotary sees only position differences: left padding alone would not tell positions apart
    row = torch.randint(2, BASE["vocab_size"], (9,))
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1], [1] * 9])
    with torch.no_grad():
        logits = model(torch.stack((row, row)), attention_mask=mask)
    real = mask[0].bool()
    assert (logits[0, real] - hf_logits(ref, row[real][None])[0]).abs().max().item() <= TOL
    assert (logits[1] - hf_logits(ref, row[None])[0]).abs().max().item() <= TOL


def test_cached_decoding_of_a_left_padded_batch(pythia):
    ref, model = pythia
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


def test_refused_model_types_rope_types_and_activations():
    with pytest.raises(ValueError, match=r"'gpt2' checkpoint; gpt_neox.py reads only 'gpt_neox'"):
        GPTNeoXConfig.from_dict({**BASE, "model_type": "gpt2"})
    for scaling in ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.25}},
                    {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rotary_pct": 0.25}):
        with pytest.raises(ValueError, match=r"rope type '(linear|dynamic)' is not implemented"):
            GPTNeoXConfig.from_dict({**BASE, "model_type": "gpt_neox", **scaling})
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        GPTNeoXConfig.from_dict({**BASE, "model_type": "gpt_neox", "hidden_act": "relu"})
    config = GPTNeoXConfig.from_dict({**BASE, "model_type": "gpt_neox", "rope_scaling": None, "rotary_pct": 0.5})
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}


def test_an_unknown_model_type_fails_before_reading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' checkpoint"):
        gpt_neox_from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "gpt_neox"}))
    with pytest.raises(FileNotFoundError, match="holds none of"):
        gpt_neox_from_pretrained(tmp_path)


def test_past_the_context_window_and_the_cache_are_errors(pythia):
    _, model = pythia
    with torch.no_grad():
        with pytest.raises(ValueError, match="max_position_embeddings=64"):
            model(torch.zeros(1, 65, dtype=torch.long))
        model.setup_cache(1, max_len=16)
        with pytest.raises(ValueError, match="holds 16 slots"):
            model(torch.zeros(1, 4, dtype=torch.long), 14)


def test_a_model_built_from_scratch_is_initialised_and_trains():
    config = GPTNeoXConfig(**{**BASE, "initializer_range": 0.05, "tie_word_embeddings": True})
    model = GPTNeoX(config)
    attn = model.gpt_neox.layers[0].attention.query_key_value
    assert abs(attn.weight.std().item() - 0.05) < 0.01 and not attn.bias.any()
    assert bool((model.gpt_neox.final_layer_norm.weight == 1).all()) and not model.gpt_neox.final_layer_norm.bias.any()
    assert model.embed_out.weight is model.gpt_neox.embed_in.weight
    idx = torch.randint(0, BASE["vocab_size"], (2, 16))
    loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_file_works_copied_alone(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    shutil.copy(Path(__file__).parents[1] / "minhub" / "gpt_neox.py", tmp_path / "gpt_neox.py")
    script = (
        "import sys, torch, gpt_neox\n"
        "model = gpt_neox.GPTNeoX(gpt_neox.GPTNeoXConfig(vocab_size=50, hidden_size=16, intermediate_size=24, "
        "num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8))\n"
        "assert gpt_neox.generate(model, torch.zeros(1, 6, dtype=torch.long), 4).shape == (1, 10)\n"
        "print(sorted(m for m in ('minhub', 'transformers', 'huggingface_hub', 'safetensors') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # the hub's libraries are imported only inside gpt_neox_from_pretrained
