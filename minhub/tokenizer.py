"""Tokenizers of hub checkpoints, as `tokenizers.Tokenizer` objects (fast, Rust): a repo's tokenizer.json, or GPT-2's
byte-level BPE built from vocab.json + merges.txt; the token ids of a conversation rendered by a chat template, and of
a fill-in-the-middle prompt."""

from __future__ import annotations

import os
from typing import Any

from minhub.hub import CheckpointFiles, MissingFileError


def tokenizer_from_pretrained(
    identifier: str | os.PathLike = "gpt2",
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
):
    """The checkpoint's tokenizer as a `tokenizers.Tokenizer`: its tokenizer.json, or else GPT-2's byte-level BPE
    built from vocab.json + merges.txt with <|endoftext|> as a special token. Arguments as `gpt2_from_pretrained`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    files = CheckpointFiles(identifier, revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                            force_download=force_download)
    path = files.get("tokenizer.json")
    if path is not None:
        return Tokenizer.from_file(str(path))
    vocab = files.get("vocab.json")
    merges = files.get("merges.txt")
    if vocab is None or merges is None:
        raise MissingFileError(f"{files} has no tokenizer: looked for tokenizer.json, or vocab.json with merges.txt"
                               f"{files.offline_hint()}")
    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tokenizer


def chat_ids(tokenizer, template, messages: list[dict], *, add_generation_prompt: bool = True,
             **extra: Any) -> list[int]:
    """The token ids of `messages` rendered by `template` (a minhub.chat.ChatTemplate), as transformers'
    `apply_chat_template(messages, add_generation_prompt=..., tokenize=True)` makes them.

    The rendered text is encoded without the tokenizer's special tokens (add_special_tokens=False, as transformers
    does): a template writes its own BOS where the model wants one ({{ bos_token }}), and the post-processor adding
    it again would give two. extra: more template variables (see ChatTemplate.render); ChatTemplateError if the
    template refuses the conversation."""
    text = template.render(messages, add_generation_prompt=add_generation_prompt, **extra)
    return tokenizer.encode(text, add_special_tokens=False).ids


# the fill-in-the-middle tokens of the BigCode models: StarCoder's and tiny_starcoder's, then SantaCoder's
FIM_TOKENS = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"))


def fim_ids(tokenizer, prefix: str, suffix: str) -> list[int]:
    """The token ids of a fill-in-the-middle prompt as the BigCode model cards write it, prefix-suffix-middle:
    `<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>`, encoded as transformers' `tokenizer.encode` does; the
    model then generates the middle. ValueError if the tokenizer has no such tokens (a model not trained for FIM)."""
    vocab = tokenizer.get_vocab()
    for fim_prefix, fim_suffix, fim_middle in FIM_TOKENS:
        if all(name in vocab for name in (fim_prefix, fim_suffix, fim_middle)):
            return tokenizer.encode(f"{fim_prefix}{prefix}{fim_suffix}{suffix}{fim_middle}").ids
    raise ValueError("this model's tokenizer has no fill-in-the-middle tokens (<fim_prefix>, <fim_suffix>, "
                     "<fim_middle>): a suffix needs a model trained for it, such as StarCoder or SantaCoder")
