"""Perplexity and token scores equal transformers' on the same weights: the strided loop of the transformers guide
("Perplexity of fixed-length models"), computed here with GPT2LMHeadModel(labels=...) as the reference."""

import json
import math

import pytest
import torch
from helpers import hf_gpt2, hub_checkpoint

from minhub import gpt2_from_pretrained, perplexity, token_logprobs, tokenizer_from_pretrained
from minhub.cli import main
from minhub.scoring import windows

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
        "was the season of Darkness. Ünïcödé — 日本語 too.")


@pytest.fixture(scope="module")
def repo():
    """GPT-2's vocabulary and real tokenizer, a 48-token context, in the hub cache as tests/scoring-gpt2."""
    reference = hf_gpt2(seed=11, vocab_size=50257, n_embd=32, n_head=4, n_layer=2, n_positions=48,
                        bos_token_id=50256, eos_token_id=50256, std=0.3).eval()
    hub_checkpoint("tests/scoring-gpt2", reference, tokenizer=True)
    return "tests/scoring-gpt2", reference


def transformers_strided_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The guide's loop, counting the tokens each window's loss actually averages over (its labels after the
    shift that are not -100)."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq_len = ids.size(1)
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        counted = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * counted
        n_tokens += counted
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("max_length, stride", [(48, 24), (48, 1), (48, 7), (20, 20), (16, 5), (48, 48)])
def test_perplexity_equals_transformers_strided_loop(repo, max_length, stride):
    name, reference = repo
    ids = tokenizer_from_pretrained(name).encode(TEXT * 2).ids
    assert len(ids) > 2 * 48  # several windows
    model = gpt2_from_pretrained(name)
    ours = perplexity(model, ids, max_length=max_length, stride=stride)
    theirs, count = transformers_strided_perplexity(reference, torch.tensor([ids]), max_length, stride)
    assert ours.tokens == count
    assert abs(ours.perplexity - theirs) / theirs <= 1e-4
    if stride < max_length:
        assert ours.tokens == len(ids) - 1  # every token after the first, once


def test_batched_windows_and_the_defaults_give_the_same_result(repo):
    name, _ = repo
    ids = tokenizer_from_pretrained(name).encode(TEXT * 3).ids
    model = gpt2_from_pretrained(name)
    one = perplexity(model, ids)  # max_length = context (48), stride 24
    assert one == perplexity(model, ids, max_length=48, stride=24)
    batched = perplexity(model, ids, batch_size=4)
    assert batched.tokens == one.tokens and abs(batched.perplexity - one.perplexity) / one.perplexity <= 1e-6


def test_token_logprobs_are_transformers_log_softmax(repo):
    name, reference = repo
    ids = tokenizer_from_pretrained(name).encode(TEXT[:120]).ids
    assert 2 < len(ids) <= 48  # one window
    scores = torch.cat(list(token_logprobs(gpt2_from_pretrained(name), ids)))
    with torch.no_grad():
        logprobs = reference(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = logprobs[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    assert (scores.float() - expected).abs().max().item() <= 1e-4


def test_windows_score_each_position_once():
    for n, max_length, stride in [(100, 48, 24), (100, 48, 1), (10, 48, 24), (97, 16, 5), (48, 48, 47)]:
        scored = [t for _, end, first in windows(n, max_length, stride) for t in range(first, end)]
        assert scored == list(range(1, n))


@pytest.mark.parametrize("kwargs, message", [
    ({"stride": 0}, r"stride must be an integer in \[1, max_length=48\], got 0"),
    ({"stride": 49}, r"stride must be an integer in \[1, max_length=48\], got 49"),
    ({"max_length": 49}, r"max_length must be an integer in \[2, 48\] \(the model's context\), got 49"),
    ({"max_length": 1}, r"max_length must be an integer in \[2, 48\]"),
    ({"batch_size": 0}, r"batch_size must be a positive integer"),
])
def test_bad_settings_are_named_before_any_work(repo, kwargs, message):
    model = gpt2_from_pretrained(repo[0])
    with pytest.raises(ValueError, match=message):
        perplexity(model, [1, 2, 3], **kwargs)


def test_too_short_texts_and_foreign_ids_are_refused(repo):
    model = gpt2_from_pretrained(repo[0])
    for ids in ([], [5]):
        with pytest.raises(ValueError, match="scoring needs at least 2"):
            perplexity(model, ids)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50257\)"):
        perplexity(model, [1, 50257])


def test_cli_perplexity_json_equals_the_api(repo, tmp_path, capsys):
    name, _ = repo
    path = tmp_path / "text.txt"
    path.write_text(TEXT * 2, encoding="utf-8")
    assert main(["perplexity", name, str(path), "--stride", "7", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = perplexity(gpt2_from_pretrained(name), tokenizer_from_pretrained(name).encode(TEXT * 2).ids, stride=7)
    assert result["tokens"] == expected.tokens and abs(result["perplexity"] - expected.perplexity) <= 1e-9


def test_cli_score_gives_every_token_its_text_and_logprob(repo, tmp_path, capsys):
    name, _ = repo
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert main(["score", name, str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    entries = result["token_scores"]
    assert "".join(e["text"] for e in entries) == TEXT
    assert entries[0]["logprob"] is None and all(e["logprob"] < 0 for e in entries[1:])
    ids = [e["id"] for e in entries]
    scores = torch.cat(list(token_logprobs(gpt2_from_pretrained(name), ids)))
    assert [e["logprob"] for e in entries[1:]] == pytest.approx(scores.tolist(), abs=1e-9)
    assert main(["score", name, str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(entries) + 1 and lines[-1].startswith("perplexity ")


@pytest.mark.parametrize("content, options, message", [
    ("", [], "is empty: there is nothing to score"),
    ("Hi", [], "the text has 1 token: scoring needs at least 2"),
    (TEXT, ["--stride", "0"], "stride must be an integer in"),
    (TEXT, ["--max-length", "4096"], "max_length must be an integer in"),
])
def test_cli_bad_input_is_one_line_and_exit_2(repo, tmp_path, capsys, content, options, message):
    path = tmp_path / "text.txt"
    path.write_text(content, encoding="utf-8")
    assert main(["perplexity", repo[0], str(path), *options]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and len(captured.err.strip().splitlines()) == 1


def test_cli_missing_file_and_unknown_model(repo, tmp_path, capsys):
    assert main(["perplexity", repo[0], str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert main(["perplexity", "nobody/missing", str(path)]) == 2
    assert "nobody/missing" in capsys.readouterr().err


@pytest.mark.parametrize("stride", [5, 16])
def test_gpt4_perplexity_equals_x_transformers_strided_loop(stride):
    import torch.nn.functional as F
    from test_gpt4 import CONFIGS, reference

    torch.manual_seed(4)
    net, ours = reference(max_seq_len=16, **CONFIGS["flash-mqa"])
    ids = torch.randint(0, 97, (1, 70))
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, 70, stride):  # the guide's loop, on x-transformers' logits
        end = min(begin + 16, 70)
        targets = ids[:, begin:end].clone()
        targets[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            logits = net(ids[:, begin:end])
        counted = (targets[:, 1:] != -100).sum().item()
        nll_sum += F.cross_entropy(logits[0, :-1], targets[0, 1:], ignore_index=-100, reduction="sum").item()
        n_tokens += counted
        prev_end = end
        if end == 70:
            break
    result = perplexity(ours, ids[0], stride=stride)
    assert result.tokens == n_tokens
    assert abs(result.perplexity - math.exp(nll_sum / n_tokens)) / result.perplexity <= 1e-4
