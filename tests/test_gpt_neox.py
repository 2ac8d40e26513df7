"""minhub/gpt_neox.py against transformers' own GPTNeoXForCausalLM, on tiny random checkpoints that save_pretrained
writes to a temporary directory: logits (parallel and sequential residual, partial and full rotary, tied and untied
heads), both config.json layouts, sharded bf16 files, pytorch_model.bin files, the KV cache, padded batches, greedy
decoding and the errors for what gpt_neox.py does not implement."""

import json

import pytest
import torch

import family_checks as fc
from family_checks import max_diff, saved
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
    return fc.randomised(model, seed, std, lambda name: name.endswith(("layernorm.weight", "layer_norm.weight")))


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
    fc.old_config_keys_are_read(ref, tmp_path, old_keys, gpt_neox_from_pretrained, BASE["vocab_size"], TOL)


def test_a_sharded_bf16_checkpoint_loads_in_float32(tmp_path):
    from transformers import GPTNeoXForCausalLM

    ref = hf_model(seed=5).to(torch.bfloat16)
    # in bf16, ours rounds as transformers' SDPA attention does (cos and sin cast to bf16 before the rotation, sums in
    # its order): one bf16 step of a logit near 6 is 0.03, where its eager attention or float32 weights differ by 0.05
    fc.sharded_bf16_loads_in_float32(ref, tmp_path, gpt_neox_from_pretrained, GPTNeoXForCausalLM, BASE["vocab_size"],
                                     TOL, bf16_tol=0.032)


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
    fc.cache_steps_equal_a_full_forward(ref, model, BASE["vocab_size"], kv_heads=4, head_size=16, tol=TOL)


def test_greedy_generation_equals_transformers(pythia):
    fc.greedy_equals_transformers(*pythia, generate, BASE["vocab_size"])


def test_generation_slides_past_the_context_window(pythia):
    fc.slides_past_the_context_window(*pythia, generate, BASE["vocab_size"], context=64)


def test_sampling_keeps_to_the_top_k(pythia):
    fc.sampling_keeps_to_the_top_k(*pythia, generate, BASE["vocab_size"])


def test_a_left_padded_batch_computes_what_each_row_does_alone(pythia):
    fc.padded_batch_equals_each_row_alone(*pythia, BASE["vocab_size"], TOL)


def test_a_row_with_a_hole_counts_only_its_real_tokens(pythia):
    fc.a_hole_counts_only_real_tokens(*pythia, BASE["vocab_size"], TOL)


def test_cached_decoding_of_a_left_padded_batch(pythia):
    fc.cached_padded_decoding_equals_each_row_alone(*pythia, BASE["vocab_size"], TOL)


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
    fc.wrong_model_type_fails_before_the_weights(tmp_path, BASE, gpt_neox_from_pretrained, "gpt_neox", "llama",
                                                 missing="holds none of")


def test_past_the_context_window_and_the_cache_are_errors(pythia):
    fc.overflows_are_errors(pythia[1], 64, context_error="max_position_embeddings=64")


def test_a_model_built_from_scratch_is_initialised_and_trains():
    config = GPTNeoXConfig(**{**BASE, "initializer_range": 0.05, "tie_word_embeddings": True})
    model = GPTNeoX(config)
    attn = model.gpt_neox.layers[0].attention.query_key_value
    assert abs(attn.weight.std().item() - 0.05) < 0.01 and not attn.bias.any()
    assert bool((model.gpt_neox.final_layer_norm.weight == 1).all()) and not model.gpt_neox.final_layer_norm.bias.any()
    assert model.embed_out.weight is model.gpt_neox.embed_in.weight
    fc.one_training_step_reaches_every_parameter(model, BASE["vocab_size"])


def test_the_file_works_copied_alone(tmp_path):
    build = ("m.GPTNeoX(m.GPTNeoXConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1, "
             "num_attention_heads=2, max_position_embeddings=8))")
    fc.works_copied_alone(tmp_path, "gpt_neox", build)
