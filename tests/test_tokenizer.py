"""The paired tokenizer: ids equal tiktoken's gpt2 encoding built from the same files, decode round-trips."""

import shutil

import pytest
import tiktoken
from helpers import TOKENIZER_DIR, put_in_hub_cache
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from minhub import MissingFileError, tokenizer_from_pretrained

CORPUS = [
    "Hello world ",
    "The meaning of life is",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\n and  double  spaces",
    "I'm sure they'll say we've done it; she'd've known. DON'T SHOUT, y'all's",
    "naïve café, Ünïcödé — “quotes” ‘single’ … ellipsis",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "def f(x):\n    return {'a': [1, 2.5e-3, -7], \"b\": None}  # comment\n",
    "<|endoftext|>The end.<|endoftext|> again",
    "numbers 1234567890 3.14159 1,000,000 0x1F",
    "\u200b zero\u200dwidth \ufeff bom",
    " " * 17 + "x" + "\n" * 5,
    "ﬁ ligature, Ⅻ numeral, ＡＢＣ fullwidth",
    "",
]


@pytest.fixture(scope="module")
def reference():
    ranks = data_gym_to_mergeable_bpe_ranks(str(TOKENIZER_DIR / "merges.txt"), str(TOKENIZER_DIR / "vocab.json"))
    return tiktoken.Encoding("gpt2-from-fixture", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


@pytest.fixture(scope="module")
def tokenizers_under_test(tmp_path_factory):
    """The tokenizer loaded both ways: from tokenizer.json, and built from vocab.json + merges.txt."""
    json_repo = tmp_path_factory.mktemp("json")
    shutil.copy(TOKENIZER_DIR / "tokenizer.json", json_repo)
    bpe_repo = tmp_path_factory.mktemp("bpe")
    shutil.copy(TOKENIZER_DIR / "vocab.json", bpe_repo)
    shutil.copy(TOKENIZER_DIR / "merges.txt", bpe_repo)
    put_in_hub_cache("tests/tokenizer-json", json_repo)
    put_in_hub_cache("tests/tokenizer-bpe", bpe_repo)
    return {"tokenizer.json": tokenizer_from_pretrained("tests/tokenizer-json"),
            "vocab+merges": tokenizer_from_pretrained("tests/tokenizer-bpe")}


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab+merges"])
@pytest.mark.parametrize("text", CORPUS)
def test_ids_equal_tiktoken_and_decode_round_trips(tokenizers_under_test, reference, source, text):
    tokenizer = tokenizers_under_test[source]
    ids = tokenizer.encode(text).ids
    assert ids == reference.encode(text, allowed_special="all")
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_long_mixed_text(tokenizers_under_test, reference):
    text = "\n".join(CORPUS) * 20
    for tokenizer in tokenizers_under_test.values():
        assert tokenizer.encode(text).ids == reference.encode(text, allowed_special="all")


def test_known_gpt2_ids(tokenizers_under_test):
    for tokenizer in tokenizers_under_test.values():
        assert tokenizer.encode("Hello world ").ids == [15496, 995, 220]  # from the real gpt2 tokenizer
        assert tokenizer.get_vocab_size() == 50257
        assert tokenizer.token_to_id("<|endoftext|>") == 50256


def test_local_directory_and_missing_tokenizer(tmp_path):
    shutil.copy(TOKENIZER_DIR / "tokenizer.json", tmp_path)
    assert tokenizer_from_pretrained(tmp_path).encode("Hello world ").ids == [15496, 995, 220]
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(MissingFileError, match="tokenizer.json, or vocab.json with merges.txt"):
        tokenizer_from_pretrained(tmp_path)
