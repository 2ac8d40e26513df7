"""minhub/llama.py against transformers' own Llama, Qwen2 and Mistral classes, on tiny random checkpoints that
save_pretrained writes to a temporary directory: logits, both config.json layouts, sharded bf16 files, the KV cache,
padded batches, greedy decoding and the errors for what llama.py does not implement."""

import pytest
import torch

import family_checks as fc
from family_checks import max_diff, saved
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
    return fc.randomised(model, seed, std, lambda name: name.endswith("norm.weight"))


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
    diff = max_diff(model, ref, torch.randint(0, BASE["vocab_size"], (2, 33)))
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
    fc.old_config_keys_are_read(ref, tmp_path, old_keys, llama_from_pretrained, BASE["vocab_size"], TOL)


def test_a_sharded_bf16_checkpoint_loads_in_float32(tmp_path):
    from transformers import LlamaForCausalLM

    ref = hf_model(seed=5, tie_word_embeddings=True).to(torch.bfloat16)
    # in bf16, transformers' SDPA attention rounds as ours does (RMSNorm cast back before the gain, cos and sin cast to
    # bf16 before the rotation): one bf16 step of a logit near 6 is 0.03, where its eager attention differs by 0.15+
    _, _, ours16, _ = fc.sharded_bf16_loads_in_float32(ref, tmp_path, llama_from_pretrained, LlamaForCausalLM,
                                                       BASE["vocab_size"], TOL, bf16_tol=0.05)
    assert ours16.lm_head.weight is ours16.model.embed_tokens.weight


def test_stored_rotary_buffers_of_old_checkpoints_are_ignored(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = hf_model(seed=11)
    saved(ref, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for i in range(BASE["num_hidden_layers"]):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(6)  # wrong on purpose
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert max_diff(llama_from_pretrained(tmp_path), ref, torch.randint(0, BASE["vocab_size"], (1, 20))) <= TOL


@pytest.mark.parametrize("case", ["gqa", "qwen2", "mistral-window"])
def test_prefill_then_steps_through_the_cache_match_a_full_forward(case, tmp_path):
    family, config = CASES[case]
    ref = hf_model(family, seed=2, **config)
    model = llama_from_pretrained(saved(ref, tmp_path))
    kv_heads = model.config.num_key_value_heads  # not repeated per query head
    fc.cache_steps_equal_a_full_forward(ref, model, BASE["vocab_size"], kv_heads, head_size=12, tol=TOL)


def test_greedy_generation_equals_transformers(gqa):
    fc.greedy_equals_transformers(*gqa, generate, BASE["vocab_size"])


def test_generation_slides_past_the_context_window(gqa):
    fc.slides_past_the_context_window(*gqa, generate, BASE["vocab_size"], context=64)


def test_sampling_keeps_to_the_top_k(gqa):
    fc.sampling_keeps_to_the_top_k(*gqa, generate, BASE["vocab_size"])


def test_a_left_padded_batch_computes_what_each_row_does_alone(gqa):
    fc.padded_batch_equals_each_row_alone(*gqa, BASE["vocab_size"], TOL)


def test_a_row_with_a_hole_counts_only_its_real_tokens(gqa):
    fc.a_hole_counts_only_real_tokens(*gqa, BASE["vocab_size"], TOL)


def test_cached_decoding_of_a_left_padded_batch(gqa):
    fc.cached_padded_decoding_equals_each_row_alone(*gqa, BASE["vocab_size"], TOL)


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
    fc.wrong_model_type_fails_before_the_weights(tmp_path, BASE, llama_from_pretrained, "llama", "gpt2",
                                                 missing="model.safetensors.index.json")


def test_past_mistrals_sliding_window_is_an_error(tmp_path):
    ref = hf_model("mistral", sliding_window=8)
    model = llama_from_pretrained(saved(ref, tmp_path))
    idx = torch.randint(0, BASE["vocab_size"], (1, 9))
    assert max_diff(model, ref, idx[:, :8]) <= TOL  # up to the window, every key is in it: the same as transformers
    with torch.no_grad():
        with pytest.raises(ValueError, match="context window of 8 \\(Mistral's sliding_window"):
            model(idx)
        model.setup_cache(1)
        model(idx[:, :6], 0)
        with pytest.raises(ValueError, match="context window of 8 \\(Mistral's sliding_window"):
            model(idx[:, 6:9], 6)


def test_past_the_context_window_and_the_cache_are_errors(gqa):
    fc.overflows_are_errors(gqa[1], 64, context_error="context window of 64: keep the last tokens")


def test_a_model_built_from_scratch_is_initialised_and_trains():
    config = LlamaConfig(**{**BASE, "attention_bias": True, "initializer_range": 0.05, "tie_word_embeddings": True})
    model = Llama(config)
    w, b = model.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.bias
    assert abs(w.std().item() - 0.05) < 0.01 and not b.any() and bool((model.model.norm.weight == 1).all())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fc.one_training_step_reaches_every_parameter(model, BASE["vocab_size"])


def test_the_file_works_copied_alone(tmp_path):
    build = ("m.Llama(m.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1, "
             "num_attention_heads=2, max_position_embeddings=8))")
    fc.works_copied_alone(tmp_path, "llama", build)
