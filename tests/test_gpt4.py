"""The GPT4-style decoder against x-transformers (the pinned reference): logits, loss, greedy tokens, KV cache, and
sampling (the filters' outputs, how often each token is drawn, seeded draws)."""

from types import SimpleNamespace

import pytest
import torch
from helpers import from_x_transformers_state_dict, hf_gpt2, put_in_hub_cache, save_checkpoint, x_transformers_gpt4
from test_generate import DRAWS, LOGITS, assert_frequencies

import minhub
from minhub import GPT4
from minhub.gpt4 import GPT4Config

x_transformers = pytest.importorskip("x_transformers")

TOL = 1e-4

CONFIGS = {
    "flash-mqa": dict(dim=32, depth=2, dim_head=16, heads=4, alibi_num_heads=2),
    "explicit-mqa": dict(dim=48, depth=3, dim_head=8, heads=6, alibi_num_heads=5, attn_flash=False),
    "flash-mha-fixed-temperature": dict(dim=32, depth=2, dim_head=16, heads=4, alibi_num_heads=4,
                                        attn_one_kv_head=False, attn_qk_norm_dim_scale=False),
    "explicit-one-alibi-head-wide-heads": dict(dim=40, depth=2, dim_head=32, heads=3, alibi_num_heads=1,
                                               attn_flash=False),
    "no-alibi-no-qk-norm": dict(dim=32, depth=2, dim_head=16, heads=4, alibi_pos_bias=False, attn_qk_norm=False),
    "no-rotary": dict(dim=32, depth=2, dim_head=16, heads=4, alibi_num_heads=3, rotary_xpos=False),
    "absolute-positions": dict(dim=32, depth=2, dim_head=16, heads=4, use_abs_pos_emb=True, alibi_pos_bias=False,
                               rotary_xpos=False),
}


reference = x_transformers_gpt4  # (x-transformers' network, minhub's GPT4 with its weights)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    torch.manual_seed(len(request.param))
    return reference(**CONFIGS[request.param])


def test_logits_and_loss_match_x_transformers(pair):
    ref, ours = pair
    tokens = torch.randint(0, 97, (3, 48))
    with torch.no_grad():
        assert (ours(tokens) - ref(tokens)).abs().max().item() <= TOL
        wrapper = x_transformers.AutoregressiveWrapper(ref)
        assert abs(ours.decoder(tokens).item() - wrapper(tokens).item()) <= 1e-5
        ignored = tokens.clone()
        ignored[0, 10:20] = -100  # ignored positions: replaced by padding as inputs, skipped as targets
        assert abs(ours.decoder(ignored).item() - wrapper(ignored).item()) <= 1e-5


def test_greedy_generation_past_max_seq_len_matches_x_transformers(pair):
    ref, ours = pair
    prompts = torch.randint(0, 97, (2, 7))
    theirs = x_transformers.AutoregressiveWrapper(ref).generate(prompts, 80, temperature=0.0, cache_kv=False)
    assert torch.equal(ours.generate(prompts, 80, temperature=0), theirs)  # the model file's own generate
    # and the package's engine, which GPT4 runs go through in minhub (the CLI): it returns prompt + new tokens
    engine = minhub.generate(ours, prompts, 80, temperature=0)
    assert torch.equal(engine[:, prompts.size(1):], theirs)


def test_cached_decoding_gives_the_logits_of_a_full_recompute(pair):
    """Prompt, then one token at a time against the KV cache: the logits of our own full forward and of
    x-transformers' (no cache) on the same weights."""
    ref, ours = pair
    net = ours.decoder.net
    seq = torch.randint(0, 97, (2, 48))
    net.setup_cache(2)
    with torch.no_grad():
        cached = torch.cat([net(seq[:, :9], 0)] + [net(seq[:, t:t + 1], t) for t in range(9, 48)], dim=1)
        assert (cached - net(seq)).abs().max().item() <= 1e-5
        assert (cached - ref(seq)).abs().max().item() <= TOL


def test_a_left_padded_batch_gives_each_row_what_x_transformers_gives_it_alone(pair):
    """The contract's padding mask: positions count real tokens (rotary, xPos, ALiBi, absolute embeddings), padding
    is hidden; the full forward's real positions and cached greedy decoding of the batch equal x-transformers on
    each prompt alone."""
    ref, ours = pair
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (9, 3, 6)]
    idx, mask = minhub.pad_left(prompts, pad_id=0)
    with torch.no_grad():
        full = ours(idx, attention_mask=mask)
        for row, prompt in enumerate(prompts):
            alone = ref(torch.tensor([prompt]))[0]
            assert (full[row, -len(prompt):] - alone).abs().max().item() <= TOL
    batched = minhub.generate(ours, idx, 12, temperature=0, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        theirs = x_transformers.AutoregressiveWrapper(ref).generate(torch.tensor([prompt]), 12, temperature=0.0,
                                                                    cache_kv=False)
        assert torch.equal(batched[row, -12:], theirs[0])


def test_eos_pads_like_x_transformers():
    torch.manual_seed(1)
    ref, ours = reference(**CONFIGS["flash-mqa"])
    prompts = torch.randint(1, 97, (3, 5))
    free = ours.generate(prompts, 30, temperature=0)
    eos = int(free[0, 6])
    if (prompts == eos).any():
        pytest.skip("the chosen EOS occurs in a prompt")
    theirs = x_transformers.AutoregressiveWrapper(ref).generate(prompts, 30, temperature=0.0, eos_token=eos,
                                                                cache_kv=False)
    assert torch.equal(ours.generate(prompts, 30, temperature=0, eos_token=eos), theirs)


@pytest.mark.parametrize("name, kwargs", [("top_k", {"k": 3}), ("top_k", {"frac_num_tokens": 0.05}),
                                          ("top_p", {"thres": 0.5}), ("top_a", {}), ("min_p", {"min_p": 0.3})])
def test_filters_match_x_transformers_and_samples_stay_inside(name, kwargs):
    from x_transformers.autoregressive_wrapper import FILTER_LOGITS_FN

    from minhub.gpt4 import FILTERS

    logits = torch.randn(16, 97) * 3
    ours, theirs = FILTERS[name](logits, **kwargs), FILTER_LOGITS_FN[name](logits.clone(), **kwargs)
    assert torch.equal(ours.isinf(), theirs.isinf())
    assert torch.allclose(ours[~ours.isinf()], theirs[~theirs.isinf()])
    torch.manual_seed(2)
    _, model = reference(**CONFIGS["flash-mqa"])
    prompts = torch.randint(0, 97, (8, 6))
    allowed = FILTERS[name](model(prompts)[:, -1].detach(), **kwargs).isfinite()
    token = model.generate(prompts, 1, filter_logits_fn=name, filter_kwargs=kwargs, temperature=0.7)[:, 0]
    assert allowed[torch.arange(8), token].all()


class _FixedLogits(torch.nn.Module):
    """A network for AutoregressiveWrapper whose next-token logits are `logits[r]` after a prompt ending in token r,
    so that the wrapper's own sampling code (filter, temperature, softmax, multinomial) runs on chosen logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.config = SimpleNamespace(max_seq_len=4)

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> None:
        pass

    def forward(self, tokens: torch.Tensor, cache_pos: int | None = None, *, only_last: bool = False):
        return self.logits[tokens[:, -1]][:, None]  # (B, 1, V)


@pytest.mark.parametrize("name, kwargs, temperature", [
    ("top_k", {"k": 3}, 0.8), ("top_k", {"frac_num_tokens": 0.5}, 1.3),
    ("top_p", {"thres": 0.7}, 1.5), ("top_p", {"thres": 0.9}, 0.7),
    ("top_a", {}, 1.0), ("top_a", {"min_p_pow": 2.0, "min_p_ratio": 0.5}, 1.2),
    ("min_p", {"min_p": 0.2}, 1.0), ("min_p", {}, 1.4),
])
def test_filtered_sampling_frequencies_equal_the_x_transformers_distribution(name, kwargs, temperature):
    """20k seeded draws per row of GPT4's sampler (AutoregressiveWrapper.generate) against the distribution
    x-transformers' generate samples from, computed with its own functions: softmax(FILTER_LOGITS_FN[name](logits) /
    temperature). A wrong threshold, a cutoff one token off, or the temperature applied before the filter (the
    temperatures are chosen so that it moves the cutoff) is off by far more than 5 standard errors."""
    from x_transformers.autoregressive_wrapper import FILTER_LOGITS_FN

    from minhub.gpt4 import AutoregressiveWrapper

    expected = (FILTER_LOGITS_FN[name](LOGITS.clone(), **kwargs) / temperature).softmax(-1)
    assert ((expected > 0).sum(-1) < LOGITS.size(-1)).any()  # the filter cuts
    rows = torch.arange(len(LOGITS)).repeat_interleave(DRAWS)[:, None]
    draws = AutoregressiveWrapper(_FixedLogits(LOGITS)).generate(
        rows, 1, filter_logits_fn=name, filter_kwargs=kwargs, temperature=temperature,
        generator=torch.Generator().manual_seed(0))
    for row, row_draws in enumerate(draws.view(len(LOGITS), DRAWS)):
        assert_frequencies(row_draws, expected[row])


@pytest.mark.parametrize("name, kwargs, one_dimensional", [
    (None, None, True),  # x-transformers' defaults: top_k with frac_num_tokens=0.1, temperature 1
    ("top_k", {"k": 5}, False), ("top_p", {"thres": 0.8}, False), ("top_a", {}, False),
    ("min_p", {"min_p": 0.1}, False),
])
def test_seeded_sampling_draws_the_tokens_x_transformers_draws(name, kwargs, one_dimensional):
    """x-transformers' generate samples with torch.multinomial on the global generator; ours, given a generator
    seeded the same, makes the same draws from the same probabilities: the sampled tokens are equal."""
    torch.manual_seed(5)
    ref, model = reference(**CONFIGS["flash-mqa"])
    prompts = torch.randint(0, 97, (6,) if one_dimensional else (3, 6))
    options = {} if name is None else dict(filter_logits_fn=name, filter_kwargs=kwargs, temperature=0.8)
    torch.manual_seed(11)
    theirs = x_transformers.AutoregressiveWrapper(ref).generate(prompts, 12, cache_kv=False, **options)
    ours = model.generate(prompts, 12, generator=torch.Generator().manual_seed(11), **options)
    assert ours.shape == theirs.shape == prompts.shape[:-1] + (12,)
    assert torch.equal(ours, theirs)
    assert torch.equal(model.generate(prompts, 12, generator=torch.Generator().manual_seed(11), **options), ours)


def test_defaults_build_on_meta_with_x_transformers_parameter_count():
    with torch.device("meta"):
        model = GPT4()
        ref = x_transformers.TransformerWrapper(
            num_tokens=50432, max_seq_len=8192, use_abs_pos_emb=False,
            attn_layers=x_transformers.Decoder(dim=2560, depth=32, attn_dim_head=128, heads=24, alibi_pos_bias=True,
                                               alibi_num_heads=12, rotary_xpos=True, attn_flash=True,
                                               attn_one_kv_head=True, attn_qk_norm=True,
                                               attn_qk_norm_dim_scale=True))
    expected = sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected
    assert 2.45e9 < expected < 2.47e9
    # every tensor has the shape of the x-transformers tensor it is loaded from (dim_head=128 honoured, one kv head)
    theirs = {name: t.shape for name, t in from_x_transformers_state_dict(ref.state_dict()).items()}
    assert {name: t.shape for name, t in model.state_dict().items()} == theirs
    with torch.device("meta"):
        logits = model(torch.randint(0, 50432, (3, 8192)))  # the documented usage example
    assert logits.shape == (3, 8192, 50432)


def test_documented_example_computes_what_x_transformers_computes():
    """The documented call (docs/gpt4.md) at a small size builds x-transformers' architecture: with its weights
    loaded (strict), the logits, the loss and the gradient of the QK-norm gains equal x-transformers'
    (TransformerWrapper and AutoregressiveWrapper) on the same tokens."""
    options = dict(num_tokens=50432, max_seq_len=64, dim=64, depth=2, dim_head=32, heads=4, alibi_num_heads=2)
    model = GPT4(**options)
    ref, _ = reference(**options)
    model.load_state_dict(from_x_transformers_state_dict(ref.state_dict()), strict=True)
    tokens = torch.randint(0, 50432, (3, 64))
    with torch.no_grad():
        assert (model(tokens) - ref(tokens)).abs().max().item() <= TOL
    loss, ref_loss = model.decoder(tokens), x_transformers.AutoregressiveWrapper(ref)(tokens)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    loss.backward()
    ref_loss.backward()
    ours_grad = model.decoder.net.layers[0].attn.q_scale.grad
    ref_grad = dict(ref.named_parameters())["attn_layers.layers.0.1.qk_norm_q_scale"].grad
    assert ours_grad.abs().max() > 0 and (ours_grad - ref_grad).abs().max() <= 1e-4 * ref_grad.abs().max()


def test_unknown_arguments_are_named():
    with pytest.raises(TypeError, match="unexpected keyword argument 'dimm'"):
        GPT4(dimm=3)


def test_keyword_arguments_override_a_given_config():
    model = GPT4(GPT4Config(num_tokens=50, max_seq_len=16, dim=32, depth=1, dim_head=16, heads=4, alibi_num_heads=2),
                 depth=2)
    assert model.config.depth == 2 and len(model.decoder.net.layers) == 2 and model.config.dim == 32


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(3)
    _, model = reference(**CONFIGS["explicit-mqa"])
    model.save_pretrained(tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").exists()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        assert not any("rotary" in k or "alibi" in k for k in f.keys())  # tables are recomputed
    tokens = torch.randint(0, 97, (2, 30))
    for source in (tmp_path / "run", "tests/gpt4-round-trip"):
        if isinstance(source, str):
            put_in_hub_cache(source, tmp_path / "run")
        loaded = GPT4.from_pretrained(source)
        with torch.no_grad():
            assert torch.equal(loaded(tokens), model(tokens))
        assert torch.equal(loaded.generate(tokens[:, :4], 20, temperature=0), model.generate(tokens[:, :4], 20,
                                                                                           temperature=0))


def test_bad_inputs(tmp_path):
    _, model = reference(**CONFIGS["flash-mqa"])
    with pytest.raises(ValueError, match="outside the vocabulary"):  # checked where tokens enter, not per forward
        minhub.generate(model, torch.tensor([[1, 97]]), 2)
    with pytest.raises(ValueError, match="exceed max_seq_len=48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="filter_logits_fn='top_z' is unknown"):
        model.generate(torch.tensor([[1, 2]]), 3, filter_logits_fn="top_z")
    with pytest.raises(ValueError, match="temperature must be"):
        model.generate(torch.tensor([[1, 2]]), 3, temperature=-1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        model.generate(torch.tensor([[1, 2]]), 3, filter_kwargs={"k": 0})
    with pytest.raises(ValueError, match="top_p thres must be in"):
        model.generate(torch.tensor([[1, 2]]), 3, filter_logits_fn="top_p", filter_kwargs={"thres": 1.5})
    with pytest.raises(minhub.ModelNotFoundError, match="not in the Hugging Face cache"):  # one error family
        minhub.gpt4_from_pretrained("nobody/no-gpt4")
    with pytest.raises(minhub.ConfigError, match="not minhub-gpt4"):
        minhub.gpt4_from_pretrained(save_checkpoint(hf_gpt2(), tmp_path / "gpt2"))
