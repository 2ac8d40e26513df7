"""Generation checked against transformers: greedy tokens, KV-cache logits, sampling (which tokens top-k / top-p
allow, how often each is drawn against transformers' logits warpers, seeded draws), batches, EOS, and generation past
the context window."""

import pytest
import torch
from helpers import hf_gpt2, hf_logits, save_checkpoint

from minhub import gpt2_from_pretrained, generate, generate_stream, pad_left, sample_next_token


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(reference transformers model, minhub model loaded from its checkpoint)."""
    ref = hf_gpt2(seed=3, n_positions=48, n_layer=3)
    path = save_checkpoint(ref, tmp_path_factory.mktemp("ckpt"), "openai")
    return ref, gpt2_from_pretrained(path)


def test_greedy_equals_transformers_generate(pair):
    ref, model = pair
    idx = torch.randint(0, 101, (4, 7))
    ours = generate(model, idx, 30, temperature=0)
    theirs = ref.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=30, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_cached_decoding_gives_the_logits_of_a_full_recompute(pair):
    ref, model = pair
    seq = torch.randint(0, 101, (2, 40))
    model.setup_cache(2)
    with torch.no_grad():
        steps = [model(seq[:, :10], 0)]
        steps += [model(seq[:, t:t + 1], t) for t in range(10, 40)]
        cached = torch.cat(steps, dim=1)
        assert (cached - model(seq)).abs().max().item() <= 1e-5
        assert (cached - hf_logits(ref, seq)).abs().max().item() <= 1e-4


def test_top_k_samples_never_leave_the_reference_top_k(pair):
    ref, model = pair
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        idx = torch.randint(0, 101, (8, 5 + trial))
        allowed = hf_logits(ref, idx)[:, -1].topk(3).indices  # (8, 3)
        token = next(generate_stream(model, idx, 1, top_k=3, temperature=1.5, generator=gen))
        assert (allowed == token[:, None]).any(dim=1).all()


def test_top_p_samples_stay_inside_the_reference_nucleus(pair):
    ref, model = pair
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        idx = torch.randint(0, 101, (8, 5 + trial))
        probs = hf_logits(ref, idx)[:, -1].softmax(-1)
        sorted_probs, order = probs.sort(descending=True, dim=-1)
        inside = (sorted_probs.cumsum(-1) - sorted_probs) < 0.6  # smallest set whose mass reaches 0.6
        token = next(generate_stream(model, idx, 1, top_k=None, top_p=0.6, generator=gen))
        for row in range(8):
            assert token[row] in order[row][inside[row]]


# The frequency tests' next-token distributions: a spread-out row and a peaked one, over a vocabulary of 10 whose
# ids are shuffled (a filter that forgets to map sorted positions back to token ids is caught). No cutoff used in the
# tests is near a tie (top-p masses are >= 0.007 from the threshold, min-p / top-a probabilities >= 5% from their
# limit), so float rounding cannot move one.
PROBS = torch.tensor([[0.40, 0.20, 0.12, 0.09, 0.07, 0.05, 0.035, 0.02, 0.01, 0.005],
                      [0.83, 0.06, 0.035, 0.025, 0.02, 0.013, 0.009, 0.005, 0.002, 0.001]])
LOGITS = PROBS.log()[:, [3, 7, 0, 9, 5, 1, 8, 2, 6, 4]]
DRAWS = 20000  # per row: 5 binomial standard errors are at most 0.018, 0.011 for a probability of 0.1


def assert_frequencies(draws: torch.Tensor, expected: torch.Tensor, sigmas: float = 5.0) -> None:
    """The frequencies of the token ids in `draws` (n,) equal the probabilities `expected` (V,) within `sigmas`
    binomial standard errors sqrt(p (1 - p) / n); a token of probability 0 is never drawn."""
    n = draws.numel()
    freq = torch.bincount(draws, minlength=expected.numel()).double() / n
    expected = expected.double()
    allowed = sigmas * (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= allowed + 1e-12).all(), (
        f"drawn {[round(f, 4) for f in freq.tolist()]}, expected {[round(e, 4) for e in expected.tolist()]}")


def transformers_distribution(logits: torch.Tensor, temperature: float, top_k: int | None,
                              top_p: float | None) -> torch.Tensor:
    """What transformers samples from: its warpers in generate's order (temperature, top-k, top-p), then softmax."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    ids = torch.zeros(logits.size(0), 0, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, None, 0.7), (1.3, None, 0.5), (0.7, None, 0.93), (1.5, None, 0.8),  # top-p alone
    (1.0, 4, 0.95),  # top-k, then top-p on what it kept
    (0.7, 4, None), (1.2, 6, None), (1.0, None, None),  # top-k alone; neither
])
def test_sampling_frequencies_equal_the_transformers_warpers_distribution(temperature, top_k, top_p):
    """20k seeded draws per row of sample_next_token (the engine's sampler) against the distribution computed with
    transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper: a sampler that returns the argmax,
    or cuts one token too early or too late, is off by far more than 5 standard errors."""
    expected = transformers_distribution(LOGITS, temperature, top_k, top_p)
    if top_k is not None or top_p is not None:
        assert ((expected > 0).sum(-1) < 10).any() and ((expected > 0).sum(-1) > 1).any()  # the filters cut
    gen = torch.Generator().manual_seed(0)
    draws = sample_next_token(LOGITS.repeat_interleave(DRAWS, 0), temperature, top_k, top_p, gen)
    for row, row_draws in enumerate(draws.view(len(LOGITS), DRAWS)):
        assert_frequencies(row_draws, expected[row])


def test_seeded_sampling_draws_the_tokens_transformers_draws(pair):
    """Without top-k / top-p both sample with torch.multinomial over the whole vocabulary: transformers' generate on
    the global generator seeded 7 and ours on a generator seeded 7 draw the same tokens; another seed differs."""
    ref, model = pair
    idx = torch.randint(0, 101, (3, 5))
    runs = [generate(model, idx, 16, temperature=0.8, top_k=None, generator=torch.Generator().manual_seed(s))
            for s in (7, 7, 8)]
    torch.manual_seed(7)
    theirs = ref.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=16, do_sample=True, top_k=0,
                          top_p=1.0, temperature=0.8, eos_token_id=None, pad_token_id=0)
    assert torch.equal(runs[0], theirs)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_left_padded_batch_rows_equal_their_solo_runs(pair):
    ref, model = pair
    prompts = [[5, 9, 13, 2, 44, 7, 1], [88], [3, 4, 5, 6]]
    idx, mask = pad_left(prompts, pad_id=0)
    batch = generate(model, idx, 25, temperature=0, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        solo = ref.generate(torch.tensor([prompt]), max_new_tokens=25, do_sample=False, eos_token_id=None,
                            pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert batch[row, idx.size(1):].tolist() == solo[0, len(prompt):].tolist()


def test_left_padded_logits_equal_unpadded_logits(pair):
    """Each row of a left-padded batch: the logits of the prompt alone, ours and transformers'."""
    ref, model = pair
    idx, mask = pad_left([[5, 9, 13, 2], [88, 3]], pad_id=0)
    with torch.no_grad():
        padded = model(idx, attention_mask=mask)
        assert (padded[1, 2:] - model(torch.tensor([[88, 3]]))[0]).abs().max() <= 1e-5
        assert (padded[1, 2:] - hf_logits(ref, torch.tensor([[88, 3]]))[0]).abs().max() <= 1e-4
        assert (padded[0] - hf_logits(ref, idx[:1])[0]).abs().max() <= 1e-4
        assert torch.isfinite(padded).all()


def test_each_row_stops_at_eos_and_is_padded_like_transformers(pair):
    ref, model = pair
    idx = torch.randint(0, 101, (3, 6))
    free = generate(model, idx, 20, temperature=0)
    eos = int(free[0, 6 + 4])  # row 0 emits this token at step 5
    ours = generate(model, idx, 20, temperature=0, eos_token_id=eos)
    theirs = ref.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(ours, theirs)
    assert (ours[0, 6 + 4:] == eos).all()


def test_generation_stops_early_when_every_row_has_finished(pair):
    _, model = pair
    idx = torch.randint(0, 101, (1, 6))
    free = generate(model, idx, 20, temperature=0)[0, 6:].tolist()
    eos = free[5]
    stop = min(free.index(eos), free.index(100) if 100 in free else 20)  # the first of the two EOS ids
    out = generate(model, idx, 20, temperature=0, eos_token_id=[eos, 100])
    assert out[0, 6:].tolist() == free[:stop + 1]


def _reference_sliding_greedy(ref, prompt, steps, n_ctx, shift):
    """Greedy decoding with transformers, no cache: each token is predicted from the current window, which drops
    its oldest `shift` tokens whenever it is full."""
    tokens, start = list(prompt), 0
    for _ in range(steps):
        if len(tokens) - start > n_ctx:
            start += shift
        window = torch.tensor([tokens[start:]])
        tokens.append(int(hf_logits(ref, window)[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize("shift", [1, 5, 12])
def test_generation_past_the_context_window_slides_it(pair, shift):
    ref, model = pair
    n_ctx = ref.config.n_positions
    prompt = torch.randint(0, 101, (20,)).tolist()
    ours = generate(model, torch.tensor([prompt]), 110, temperature=0, window_shift=shift)
    expected = _reference_sliding_greedy(ref, prompt, 110, n_ctx, shift)
    assert ours[0].tolist() == expected
    # never grows past the window (+ the engine's spare slot)
    assert all(cache.k.size(2) == n_ctx + 1 for cache in model.kv_caches())


def test_by_default_generation_past_the_window_sees_exactly_the_last_n_positions_tokens(pair):
    ref, model = pair
    prompt = torch.randint(0, 101, (30,)).tolist()
    expected = _reference_sliding_greedy(ref, prompt, 40, ref.config.n_positions, 1)
    assert generate(model, torch.tensor([prompt]), 40, temperature=0)[0].tolist() == expected


def test_stream_yields_what_generate_returns(pair):
    _, model = pair
    idx = torch.randint(0, 101, (2, 4))
    streamed = list(generate_stream(model, idx, 12, top_k=10, generator=torch.Generator().manual_seed(3)))
    full = generate(model, idx, 12, top_k=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.stack(streamed, dim=1), full[:, 4:])


def test_zero_new_tokens_and_one_dimensional_prompts(pair):
    """A 1-D prompt gives the 1-D greedy continuation transformers' generate gives for that prompt."""
    ref, model = pair
    idx = torch.randint(0, 101, (2, 4))
    assert torch.equal(generate(model, idx, 0), idx)
    one = generate(model, idx[0], 5, temperature=0)
    theirs = ref.generate(idx[:1], attention_mask=torch.ones_like(idx[:1]), max_new_tokens=5, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert one.dim() == 1 and torch.equal(one, theirs[0])


@pytest.mark.parametrize("setting", [dict(temperature=1e-300), dict(temperature=1e-45), dict(top_p=1e-46)])
def test_vanishing_temperature_or_top_p_is_greedy_decoding(pair, setting):
    """The limit of sampling as temperature -> 0 (or top_p -> 0) is the argmax: transformers' greedy tokens, not a
    softmax of infinities (float32 rounds such a temperature or top_p to 0)."""
    ref, model = pair
    idx = torch.randint(0, 101, (2, 5))
    theirs = ref.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    sampled = generate(model, idx, 10, top_k=None, generator=torch.Generator().manual_seed(0),
                       **{"temperature": 1.0, **setting})
    assert torch.equal(sampled, theirs)


def test_the_cache_holds_what_the_call_needs_not_the_whole_context():
    """A 128k-context model answering in a few tokens must not set up a cache of 128k slots (gigabytes)."""
    from minhub.generation import cache_length

    assert cache_length(131072, 40) == 1024 and cache_length(131072, 1025) == 2048
    assert cache_length(131072, 5000) == 8192 and cache_length(1024, 40) == 1024
    assert cache_length(3000, 2500) == 3000 and cache_length(3000, 3001) == 3000  # past the context: it slides


def test_a_long_context_model_decodes_transformers_tokens_in_a_cache_of_what_it_needs(tmp_path):
    ref = hf_gpt2(seed=5, n_positions=4096)
    model = gpt2_from_pretrained(save_checkpoint(ref, tmp_path))
    prompt = torch.randint(0, 101, (2, 7))
    theirs = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, min_new_tokens=20,
                          do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, prompt, 20, temperature=0), theirs)
    assert model.cache_len == 1025  # 27 positions: 1,024 slots and the spare one, not 4,097
