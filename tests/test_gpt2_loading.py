"""Loading through the real hub code path (offline cache) and parity with transformers' GPT2LMHeadModel."""

import json

import pytest
import torch
from helpers import hf_gpt2, hf_logits, hub_checkpoint, openai_layout_checkpoint, put_in_hub_cache, save_checkpoint

from minhub import GPT2Config, gpt2_from_pretrained

TOL = 1e-4  # max |Δlogit| in fp32

CONFIGS = {
    "small": {},
    "wide-mlp-exact-gelu-layer-scaled": dict(n_inner=80, activation_function="gelu",
                                              scale_attn_by_inverse_layer_idx=True, n_layer=3),
    "relu-unscaled-upcast": dict(activation_function="relu", scale_attn_weights=False,
                                 reorder_and_upcast_attn=True, n_head=2, layer_norm_epsilon=1e-3),
    "one-head-odd-sizes": dict(n_embd=24, n_head=1, n_positions=17, vocab_size=37),
}


@pytest.mark.parametrize("layout", ["save_pretrained", "openai", "openai+masked_bias"])
@pytest.mark.parametrize("config", CONFIGS)
def test_logits_match_transformers_through_the_hub_cache(layout, config):
    ref = hf_gpt2(seed=len(config) + len(layout), **CONFIGS[config])
    repo = f"tests/parity-{config}-{layout.replace('+', '-')}"
    commit = hub_checkpoint(repo, ref, layout)
    for revision in (None, "main", commit):
        model = gpt2_from_pretrained(repo, revision=revision)
        assert model.commit_hash == commit
        n_pos = ref.config.n_positions
        idx = torch.randint(0, ref.config.vocab_size, (3, n_pos))
        with torch.no_grad():
            diff = (model(idx) - hf_logits(ref, idx)).abs().max().item()
        assert diff <= TOL, f"max |Δlogit| = {diff}"


def test_the_124m_shape_loads_with_the_exact_parameter_count(tmp_path):
    from transformers import GPT2LMHeadModel

    directory = openai_layout_checkpoint(tmp_path / "gpt2")  # the real gpt2's shapes, names and config.json
    put_in_hub_cache("tests/gpt2-124m-shape", directory)
    model = gpt2_from_pretrained("tests/gpt2-124m-shape")
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # the published count for openai-community/gpt2
    ref = GPT2LMHeadModel.from_pretrained(directory).eval()
    idx = torch.randint(0, 50257, (1, 24))
    with torch.no_grad():
        assert (model(idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_lm_head_is_tied_to_the_token_embedding():
    hub_checkpoint("tests/tied", hf_gpt2(), "openai")
    model = gpt2_from_pretrained("tests/tied")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert len(list(model.parameters())) == len(model.state_dict()) - 1  # lm_head counted once: it is wte


def test_untied_head_is_kept_when_the_config_says_so(tmp_path):
    ref = hf_gpt2(tie_word_embeddings=False)
    with torch.no_grad():
        ref.lm_head.weight.normal_()
    hub_checkpoint("tests/untied", ref)
    model = gpt2_from_pretrained("tests/untied")
    assert model.lm_head.weight is not model.transformer.wte.weight
    idx = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        assert (model(idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_local_directory(tmp_path):
    ref = hf_gpt2()
    save_checkpoint(ref, tmp_path / "ckpt", "openai")
    model = gpt2_from_pretrained(tmp_path / "ckpt")
    assert model.commit_hash is None
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        assert (model(idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_sharded_safetensors(tmp_path):
    ref = hf_gpt2()
    save_checkpoint(ref, tmp_path / "ckpt", max_shard_size="20KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "ckpt").glob("model-*.safetensors"))) > 1
    put_in_hub_cache("tests/sharded", tmp_path / "ckpt")
    model = gpt2_from_pretrained("tests/sharded")
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        assert (model(idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_pytorch_model_bin_fallback(tmp_path):
    ref = hf_gpt2()
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    put_in_hub_cache("tests/bin-only", tmp_path)
    model = gpt2_from_pretrained("tests/bin-only")
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        assert (model(idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_half_precision_checkpoint_is_upcast_and_dtype_is_honoured(tmp_path):
    ref = hf_gpt2()
    save_checkpoint(ref.half(), tmp_path / "ckpt")
    model = gpt2_from_pretrained(tmp_path / "ckpt")
    assert model.lm_head.weight.dtype == torch.float32
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        assert (model(idx) - hf_logits(ref.float(), idx)).abs().max().item() <= TOL
    bf16 = gpt2_from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert (bf16(idx).float() - hf_logits(ref.float(), idx)).abs().max().item() < 0.5


def test_revisions_load_the_files_of_their_own_commit(tmp_path):
    old, new = hf_gpt2(seed=1), hf_gpt2(seed=2)
    repo = "tests/two-commits"
    save_checkpoint(old, tmp_path / "old")
    save_checkpoint(new, tmp_path / "new")
    old_commit = put_in_hub_cache(repo, tmp_path / "old", refs=("v1.0",))
    new_commit = put_in_hub_cache(repo, tmp_path / "new", refs=("main",))
    idx = torch.randint(0, 101, (1, 12))
    for revision, ref, commit in [("v1.0", old, old_commit), (old_commit, old, old_commit),
                                  (None, new, new_commit), ("main", new, new_commit)]:
        model = gpt2_from_pretrained(repo, revision)
        assert model.commit_hash == commit
        with torch.no_grad():
            assert (model(idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_cache_dir_and_local_files_only_are_passed_through(tmp_path):
    ref = hf_gpt2()
    save_checkpoint(ref, tmp_path / "ckpt")
    put_in_hub_cache("tests/own-cache", tmp_path / "ckpt", cache=tmp_path / "cache")
    model = gpt2_from_pretrained("tests/own-cache", cache_dir=tmp_path / "cache", local_files_only=True)
    idx = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        assert (model(idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_config_fields_are_read_from_config_json(tmp_path):
    ref = hf_gpt2(n_inner=48, layer_norm_epsilon=1e-3, n_positions=40, bos_token_id=5, eos_token_id=7)
    save_checkpoint(ref, tmp_path)
    config = gpt2_from_pretrained(tmp_path).config
    assert (config.n_inner, config.layer_norm_epsilon, config.n_positions) == (48, 1e-3, 40)
    assert (config.bos_token_id, config.eos_token_id) == (5, 7)
    assert GPT2Config.from_dict(json.loads((tmp_path / "config.json").read_text())) == config


def test_model_on_requested_device_is_in_eval_mode(tmp_path):
    save_checkpoint(hf_gpt2(), tmp_path)
    model = gpt2_from_pretrained(tmp_path, device="cpu")
    assert not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())


def test_writing_to_loaded_weights_never_changes_the_checkpoint_file(tmp_path):
    """Weights are memory-mapped from the file for a fast load; the mapping must be private (copy on write)."""
    import hashlib

    directory = save_checkpoint(hf_gpt2(), tmp_path / "ckpt", "openai")
    digest = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    model = gpt2_from_pretrained(directory)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0).add_(1.0)
    del model
    assert hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest() == digest
