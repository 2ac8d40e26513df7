"""Every bad input gets a specific, readable error that says what to do, and loading never runs code."""

import os
import pickle
import shutil

import pytest
import torch
from helpers import hf_gpt2, hub_checkpoint, put_in_hub_cache, save_checkpoint
from safetensors.torch import load_file, save_file

from minhub import (
    CheckpointError,
    ConfigError,
    GPT2Config,
    MissingFileError,
    ModelNotFoundError,
    RevisionNotFoundError,
    generate,
    gpt2_from_pretrained,
    tokenizer_from_pretrained,
)
from minhub.gpt2 import GPT2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()


@pytest.fixture
def ckpt(tmp_path):
    return save_checkpoint(hf_gpt2(), tmp_path / "ckpt")


# --- hub and files ------------------------------------------------------------------------------------------------


def test_unknown_repo_offline():
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        gpt2_from_pretrained("nobody/no-such-model")


def test_unknown_revision_offline_lists_what_is_cached():
    commit = hub_checkpoint("tests/revisions", hf_gpt2())
    with pytest.raises(RevisionNotFoundError, match=r"'v9'.*Cached branches/tags: \['main'\]") as info:
        gpt2_from_pretrained("tests/revisions", revision="v9")
    assert commit in str(info.value)
    with pytest.raises(RevisionNotFoundError):
        gpt2_from_pretrained("tests/revisions", revision=commit[:7])  # offline, short shas cannot be resolved


def test_offline_without_the_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    put_in_hub_cache("tests/config-only", ckpt)
    with pytest.raises(MissingFileError, match="no weights.*model.safetensors.*run once with network access"):
        gpt2_from_pretrained("tests/config-only")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(MissingFileError, match="no config.json"):
        gpt2_from_pretrained(ckpt)


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(ModelNotFoundError, match="looks like a path but is not a directory"):
        gpt2_from_pretrained(tmp_path / "nowhere")


def test_revision_given_for_a_directory(ckpt):
    with pytest.raises(ValueError, match="a directory has no revisions"):
        gpt2_from_pretrained(ckpt, revision="main")


def test_online_errors_are_translated(monkeypatch):
    """The hub's online answers cannot happen offline: raise them from the download function itself."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import errors

    response = SimpleNamespace(headers={}, request=None, status_code=404)

    for hub_error, ours, words in [
        (errors.RepositoryNotFoundError, ModelNotFoundError, "no repository 'org/typo' on the hub"),
        (errors.GatedRepoError, ModelNotFoundError, "gated repository"),
        (errors.RevisionNotFoundError, RevisionNotFoundError, "has no revision 'nope'"),
    ]:
        def fail(*args, _e=hub_error, **kwargs):
            raise _e("404 from the hub", response=response)

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
        with pytest.raises(ours, match=words):
            gpt2_from_pretrained("org/typo", revision="nope")


def test_truncated_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated.*force_download=True"):
        gpt2_from_pretrained(ckpt)


def test_garbage_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        gpt2_from_pretrained(ckpt)


def test_invalid_config_json(ckpt):
    (ckpt / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        gpt2_from_pretrained(ckpt)


def _rewrite_weights(ckpt, edit):
    state = load_file(ckpt / "model.safetensors")
    edit(state)
    save_file(state, ckpt / "model.safetensors")


def test_missing_weights_are_named(ckpt):
    _rewrite_weights(ckpt, lambda s: [s.pop("transformer.h.1.mlp.c_fc.bias"), s.pop("transformer.ln_f.weight")])
    with pytest.raises(CheckpointError, match=r"missing weights: transformer\.h\.1\.mlp\.c_fc\.bias, "
                                              r"transformer\.ln_f\.weight"):
        gpt2_from_pretrained(ckpt)


def test_unexpected_weights_are_named(ckpt):
    _rewrite_weights(ckpt, lambda s: s.update({"transformer.h.5.attn.c_attn.weight": torch.zeros(32, 96),
                                               "score.weight": torch.zeros(2, 32)}))
    with pytest.raises(CheckpointError, match=r"unexpected weights: score\.weight, transformer\.h\.5\.attn\.c_attn"):
        gpt2_from_pretrained(ckpt)


def test_misshaped_weights_are_named(ckpt):
    _rewrite_weights(ckpt, lambda s: s.update({"transformer.wpe.weight": torch.zeros(10, 32),
                                               "transformer.h.0.mlp.c_fc.weight": torch.zeros(32, 100)}))
    with pytest.raises(CheckpointError, match=r"wrongly shaped weights: transformer\.h\.0\.mlp\.c_fc\.weight "
                                              r"\(32, 100\) \(expected \(32, 128\)\), transformer\.wpe\.weight "
                                              r"\(10, 32\) \(expected \(64, 32\)\)"):
        gpt2_from_pretrained(ckpt)


def test_config_and_weights_of_different_models(ckpt, tmp_path):
    other = save_checkpoint(hf_gpt2(n_layer=3), tmp_path / "other")
    shutil.copy(other / "config.json", ckpt / "config.json")
    with pytest.raises(CheckpointError, match=r"missing weights: transformer\.h\.2\."):
        gpt2_from_pretrained(ckpt)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_a_pickle_that_would_run_code_is_refused(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (ckpt / "model.safetensors").unlink()
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": _RunsCode()}, f)
    with pytest.raises(CheckpointError, match="unpickling them could run code"):
        gpt2_from_pretrained(ckpt)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_unsupported_configs_are_refused(ckpt):
    for change, words in [
        ({"model_type": "llama"}, "'llama' checkpoint, not GPT-2"),
        ({"activation_function": "gelu_10"}, "activation_function='gelu_10' is not implemented; use one of"),
        ({"add_cross_attention": True}, "add_cross_attention=True"),
        ({"n_head": 5}, r"n_embd \(32\) must be divisible by n_head \(5\)"),
    ]:
        import json

        config = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=words):
            gpt2_from_pretrained(ckpt)
        (ckpt / "config.json").write_text(json.dumps(config))


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="'nobody/no-such-tokenizer' is not in the Hugging Face cache"):
        tokenizer_from_pretrained("nobody/no-such-tokenizer")


# --- model inputs and sampling parameters -------------------------------------------------------------------------


# token ids are checked where they enter (generate, the CLI), not in the forward, which training runs every step


def test_token_id_out_of_range(model):
    with pytest.raises(ValueError, match=r"token ids \[50\] are outside the vocabulary \[0, 50\)"):
        generate(model, torch.tensor([[1, 50]]), 3)
    with pytest.raises(ValueError, match=r"token ids \[-1\] are outside"):
        generate(model, torch.tensor([[-1, 2]]), 3)


def test_input_longer_than_the_context(model):
    with pytest.raises(ValueError, match=r"do not fit the context window n_positions=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"17 tokens but the context window is 16.*idx\[:, -16:\]"):
        generate(model, torch.zeros(1, 17, dtype=torch.long), 1)


def test_wrong_input_type(model):
    with pytest.raises(TypeError, match=r"integer tensor of shape \(batch, sequence\)"):
        generate(model, torch.zeros(1, 3), 2)
    with pytest.raises(TypeError, match="integer tensor"):
        generate(model, [[1, 2, 3]], 2)


@pytest.mark.parametrize("kwargs, words", [
    (dict(top_k=0), "top_k must be a positive integer"),
    (dict(top_k=-3), "top_k must be a positive integer"),
    (dict(top_k=2.5), "top_k must be a positive integer"),
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(eos_token_id=99), r"eos_token_id 99 is outside the vocabulary"),
    (dict(window_shift=16), r"window_shift must be in \[1, context_length=16\)"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), "must be left padding"),
    (dict(attention_mask=torch.tensor([[0, 2, 1]])), "only 0 .padding. and 1"),
    (dict(attention_mask=torch.tensor([[1, 1]])), "attention_mask has shape"),
])
def test_nonsense_generation_arguments(model, kwargs, words):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=words):
        generate(model, torch.tensor([[1, 2, 3]]), **kwargs)


def test_cache_too_small(model):
    model.setup_cache(1, 4)
    with pytest.raises(ValueError, match="the KV cache holds 4 slots.*setup_cache"):
        model(torch.zeros(1, 5, dtype=torch.long), 0)
