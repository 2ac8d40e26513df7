"""Fill-in-the-middle for BigCode models: the prompt the model cards prescribe
(`<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>`), encoded as transformers encodes it, and `minhub generate
--suffix` printing the prefix, the greedy middle and the suffix. Reference: transformers' tokenizer on the model card's
string, and minhub.generate on those ids (itself compared with transformers in tests/test_gpt_bigcode.py)."""

import pytest
import torch
from helpers import put_in_hub_cache

import minhub
from minhub.cli import main
from minhub.tokenizer import fim_ids, tokenizer_from_pretrained

CODE = ["def add(a, b):\n    return a + b\n", "def print_hello():\n    print('hello')\n",
        "x = [i * i for i in range(9)]\n"]


def bigcode_repo(tmp_path, name: str, fim_tokens: tuple[str, ...]) -> str:
    """A random transformers GPTBigCode with a byte-level BPE tokenizer holding `fim_tokens` as special tokens, in
    the hub cache as `name`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM, PreTrainedTokenizerFast

    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "code.txt"
    corpus.write_text("".join(CODE) * 20)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([str(corpus)], trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>", *fim_tokens],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = tmp_path / "repo"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                            additional_special_tokens=list(fim_tokens)).save_pretrained(directory)
    torch.manual_seed(0)
    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=tokenizer.get_vocab_size(), n_embd=32, n_layer=2,
                                                   n_head=4, n_positions=128, eos_token_id=0, bos_token_id=0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(directory)
    put_in_hub_cache(name, directory)
    return name


@pytest.mark.parametrize("tokens", [("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
                                    ("<fim-prefix>", "<fim-suffix>", "<fim-middle>")], ids=["starcoder", "santacoder"])
def test_fim_prompt_ids_are_the_model_cards_string_encoded_by_transformers(tmp_path, tokens):
    from transformers import AutoTokenizer

    name = bigcode_repo(tmp_path, f"tests/fim-{tokens[0][5:-1]}", tokens)
    ours = tokenizer_from_pretrained(name)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "repo")
    prefix, suffix = "def print_hello_world():\n    ", "\n    print('Hello world!')"
    expected = theirs.encode(f"{tokens[0]}{prefix}{tokens[1]}{suffix}{tokens[2]}")
    assert fim_ids(ours, prefix, suffix) == expected
    assert expected.count(ours.token_to_id(tokens[2])) == 1


def test_cli_suffix_prints_the_prefix_the_greedy_middle_and_the_suffix(tmp_path, capsys):
    name = bigcode_repo(tmp_path, "tests/fim-cli", ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))
    capsys.readouterr()  # transformers' progress bars while saving
    prefix, suffix = "def add(a, b):\n    ", "\n"
    assert main(["generate", name, prefix, "--suffix", suffix, "--max-new-tokens", "12", "--temperature", "0"]) == 0
    model, tokenizer = minhub.from_pretrained(name), tokenizer_from_pretrained(name)
    ids = fim_ids(tokenizer, prefix, suffix)
    new = minhub.generate(model, torch.tensor([ids]), 12, temperature=0, eos_token_id=0)[0, len(ids):].tolist()
    middle = tokenizer.decode(new[:new.index(0)] if 0 in new else new)
    assert capsys.readouterr().out == prefix + middle + suffix + "\n"


def test_a_suffix_for_a_model_without_fim_tokens_is_one_line(tmp_path, capsys):
    name = bigcode_repo(tmp_path, "tests/no-fim", ())
    capsys.readouterr()  # transformers' progress bars while saving
    assert main(["generate", name, "def f():", "--suffix", "\n", "--max-new-tokens", "4"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("minhub: this model's tokenizer has no fill-in-the-middle")


def test_the_server_maps_suffix_onto_the_fim_prompt_and_refuses_it_without_fim_tokens(tmp_path):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from minhub.serve import build_app

    name = bigcode_repo(tmp_path / "fim", "tests/fim-serve", ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))
    prefix, suffix = "def add(a, b):\n    ", "\n"
    model, tokenizer = minhub.from_pretrained(name), tokenizer_from_pretrained(name)
    ids = fim_ids(tokenizer, prefix, suffix)
    new = minhub.generate(model, torch.tensor([ids]), 8, temperature=0, eos_token_id=0)[0, len(ids):].tolist()
    with TestClient(build_app(name, max_batch=2)) as http:
        answer = http.post("/v1/completions", json={"model": name, "prompt": prefix, "suffix": suffix,
                                                     "max_tokens": 8, "temperature": 0})
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["text"] == tokenizer.decode(new[:new.index(0)] if 0 in new else new)
        echoed = http.post("/v1/completions", json={"model": name, "prompt": prefix, "suffix": suffix, "echo": True})
        assert echoed.status_code == 400 and echoed.json()["error"]["param"] == "suffix"
    plain = bigcode_repo(tmp_path / "plain", "tests/no-fim-serve", ())
    with TestClient(build_app(plain, max_batch=2)) as http:
        refused = http.post("/v1/completions", json={"model": plain, "prompt": prefix, "suffix": suffix})
        assert refused.status_code == 400 and "no fill-in-the-middle tokens" in refused.json()["error"]["message"]
