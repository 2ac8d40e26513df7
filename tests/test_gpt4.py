"""The GPT4-style decoder against x-transformers (the pinned reference): logits, loss, greedy tokens, KV cache."""

import pytest
import torch
from helpers import from_x_transformers_state_dict, hf_gpt2, put_in_hub_cache, save_checkpoint

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


def reference(num_tokens=97, max_seq_len=48, **options):
    """x-transformers' TransformerWrapper + Decoder with the GPT4 options, gains perturbed away from their init."""
    cfg = GPT4Config(num_tokens=num_tokens, max_seq_len=max_seq_len, **options)
    net = x_transformers.TransformerWrapper(
        num_tokens=cfg.num_tokens, max_seq_len=cfg.max_seq_len, use_abs_pos_emb=cfg.use_abs_pos_emb,
        attn_layers=x_transformers.Decoder(
            dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, attn_dim_head=cfg.dim_head,
            alibi_pos_bias=cfg.alibi_pos_bias, alibi_num_heads=cfg.alibi_num_heads, rotary_xpos=cfg.rotary_xpos,
            attn_flash=cfg.attn_flash, attn_one_kv_head=cfg.attn_one_kv_head, attn_qk_norm=cfg.attn_qk_norm,
            attn_qk_norm_dim_scale=cfg.attn_qk_norm_dim_scale,
        ),
    ).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("gamma", "_scale")):  # norm gains and QK-norm scales: a missed mapping shows
                p.add_(torch.randn_like(p) * 0.3)
            if name.endswith(".bias") or name == "pos_emb.emb.weight":
                p.add_(torch.randn_like(p) * 0.1)
    ours = GPT4(cfg).eval()
    ours.load_state_dict(from_x_transformers_state_dict(net.state_dict()), strict=True)
    return net, ours


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
    _, ours = pair
    net = ours.decoder.net
    seq = torch.randint(0, 97, (2, 48))
    net.setup_cache(2)
    with torch.no_grad():
        steps = [net(seq[:, :9], 0)] + [net(seq[:, t:t + 1], t) for t in range(9, 48)]
        assert (torch.cat(steps, dim=1) - net(seq)).abs().max().item() <= 1e-5


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


def test_one_dimensional_prompt_and_seeded_sampling():
    _, model = reference(**CONFIGS["flash-mqa"])
    prompt = torch.randint(0, 97, (6,))
    a = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0))
    assert a.shape == (10,) and torch.equal(a, b)


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
    assert model.decoder.net.layers[0].attn.to_q.weight.shape == (24 * 128, 2560)  # dim_head=128 honoured
    with torch.device("meta"):
        logits = model(torch.randint(0, 50432, (3, 8192)))  # the documented usage example
    assert logits.shape == (3, 8192, 50432)


def test_documented_example_runs_with_a_small_config():
    model = GPT4(num_tokens=50432, max_seq_len=64, dim=64, depth=2, dim_head=32, heads=4, alibi_num_heads=2)
    logits = model(torch.randint(0, 50432, (3, 64)))
    assert logits.shape == (3, 64, 50432) and torch.isfinite(logits).all()
    loss = model.decoder(torch.randint(0, 50432, (3, 64)))
    loss.backward()
    assert model.decoder.net.layers[0].attn.q_scale.grad is not None


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
