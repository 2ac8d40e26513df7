"""minhub/gpt_bigcode.py against transformers' own GPTBigCodeForCausalLM, on tiny random checkpoints that
save_pretrained writes to a temporary directory: logits for multi-query and multi-head attention, tied and untied
heads, sharded bf16 files, pytorch_model.bin, the KV cache, padded batches, greedy decoding and the errors."""

import pytest
import torch

import family_checks as fc
from family_checks import hf_logits, max_diff, saved
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

    def is_gain(name):  # ln_1, ln_2 and ln_f's weights
        return name.endswith("weight") and name.split(".")[-2].startswith("ln_")

    model = GPTBigCodeForCausalLM(HFConfig(**{**BASE, **config}, attn_implementation="eager"))
    return fc.randomised(model, seed, std, is_gain)


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
    diff = max_diff(model, ref, torch.randint(0, V, (2, 33)))
    assert diff <= TOL, f"max |Δlogit| = {diff}"


def test_a_sharded_bf16_checkpoint_loads_in_float32(tmp_path):
    from transformers import GPTBigCodeForCausalLM

    # in bf16, transformers' SDPA attention rounds as ours does (a bf16 step of a logit near 5 is 0.03); its eager
    # attention rounds elsewhere: ours is within twice its distance from the fp32 logits
    idx, expected, ours16, logits = fc.sharded_bf16_loads_in_float32(
        hf_model(seed=5).to(torch.bfloat16), tmp_path, gpt_bigcode_from_pretrained, GPTBigCodeForCausalLM, V, TOL,
        bf16_tol=0.05)
    assert ours16.lm_head.weight is ours16.transformer.wte.weight
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
    assert max_diff(gpt_bigcode_from_pretrained(tmp_path), ref, torch.randint(0, V, (1, 20))) <= TOL


def test_a_base_model_checkpoint_without_the_transformer_prefix(tmp_path):
    ref = hf_model(seed=13)
    from safetensors.torch import load_file

    saved(ref.transformer, tmp_path)  # GPTBigCodeModel: wte.weight, h.0..., no lm_head
    assert "wte.weight" in load_file(tmp_path / "model.safetensors")
    assert max_diff(gpt_bigcode_from_pretrained(tmp_path), ref, torch.randint(0, V, (1, 20))) <= TOL


def test_prefill_then_steps_through_the_cache_match_a_full_forward(pair):
    ref, model = pair
    n_kv = 1 if model.config.multi_query else 4  # multi-query: one head cached
    fc.cache_steps_equal_a_full_forward(ref, model, V, n_kv, head_size=12, tol=TOL)


def test_greedy_generation_equals_transformers(pair):
    fc.greedy_equals_transformers(*pair, generate, V)


def test_generation_slides_past_the_context_window(pair):
    fc.slides_past_the_context_window(*pair, generate, V, context=64)


def test_sampling_keeps_to_the_top_k(pair):
    fc.sampling_keeps_to_the_top_k(*pair, generate, V)


def test_a_left_padded_batch_computes_what_each_row_does_alone(pair):
    fc.padded_batch_equals_each_row_alone(*pair, V, TOL)


def test_a_row_with_a_hole_counts_only_its_real_tokens(pair):
    fc.a_hole_counts_only_real_tokens(*pair, V, TOL)


def test_cached_decoding_of_a_left_padded_batch(pair):
    fc.cached_padded_decoding_equals_each_row_alone(*pair, V, TOL)


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
    fc.wrong_model_type_fails_before_the_weights(tmp_path, BASE, gpt_bigcode_from_pretrained, "gpt_bigcode", "llama",
                                                 missing="holds none of model.safetensors")


def test_past_the_context_window_and_the_cache_are_errors(pair):
    fc.overflows_are_errors(pair[1], 64, context_error="n_positions=64")


def test_a_model_built_from_scratch_is_initialised_and_trains():
    model = GPTBigCode(GPTBigCodeConfig(**{**BASE, "initializer_range": 0.05}))
    attn = model.transformer.h[0].attn
    assert attn.c_attn.weight.shape == (48 + 2 * 12, 48)  # multi-query: all queries, one key, one value
    assert abs(attn.c_attn.weight.std().item() - 0.05) < 0.01 and not attn.c_attn.bias.any()
    assert abs(attn.c_proj.weight.std().item() - 0.05 / 2) < 0.005  # / sqrt(2 * n_layer)
    assert bool((model.transformer.ln_f.weight == 1).all()) and model.lm_head.weight is model.transformer.wte.weight
    untied = GPTBigCode(GPTBigCodeConfig(**{**BASE, "tie_word_embeddings": False}))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    fc.one_training_step_reaches_every_parameter(model, V)


def test_the_file_works_copied_alone(tmp_path):
    build = "m.GPTBigCode(m.GPTBigCodeConfig(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=8))"
    fc.works_copied_alone(tmp_path, "gpt_bigcode", build)
