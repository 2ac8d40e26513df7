"""Llama-family checkpoints through every entry point of the package, as the hub ships them: random tiny transformers
LlamaForCausalLM / Qwen2ForCausalLM models saved by save_pretrained with a real tokenizer (byte-level BPE; Llama 3's
special tokens and its BOS-adding post-processor, or Qwen2's without a BOS), a chat template, and a
generation_config.json listing several EOS ids, placed in the offline hub cache.

The references are transformers itself on the same files: its logits, its AutoTokenizer, its greedy `generate` with
the same EOS ids, its loss. Other test files import the builders (tests/test_chat_serve.py)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import put_in_hub_cache

import minhub
from minhub.llama import Llama

TOL = 1e-4  # max |Δlogit| in fp32
CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris is the capital.",
          "Hello, how are you today? I am fine, thank you.", "Once upon a time there was a little model.",
          "Tell me a story about the sea, the wind and the stars."] * 3
# Meta-Llama-3-8B-Instruct's chat template (no date header: a render does not depend on the day)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
FAMILIES = {  # special tokens (added after the BPE vocabulary, as in Llama 3 and Qwen2), BOS, EOS ids, template
    "llama": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>",
                  stops=["<|end_of_text|>", "<|eot_id|>"], template=LLAMA3_TEMPLATE),
    "qwen2": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                  stops=["<|im_end|>", "<|endoftext|>"], template=None),  # None: Qwen2.5's, from tests/fixtures/chat
}
SIZES = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
REPOS = {"llama": "tests/tiny-llama", "qwen2": "tests/tiny-qwen2"}
EOS_SCALE = 1.5  # the EOS rows of the LM head are scaled: greedy decoding ends at them on some prompts, not others


def byte_level_bpe(family: str):
    """A `tokenizers` byte-level BPE trained on CORPUS (the whole byte alphabet, 64 merges), the family's special
    tokens added at the end of the vocabulary, and for Llama 3 its post-processor: ByteLevel, then BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    spec = FAMILIES[family]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_special_tokens(spec["specials"])
    steps = [processors.ByteLevel(trim_offsets=False)]
    if spec["bos"] is not None:
        bos = spec["bos"]
        steps.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                                   special_tokens=[(bos, tokenizer.token_to_id(bos))]))
    tokenizer.post_processor = processors.Sequence(steps)
    return tokenizer


def hf_tokenizer(family: str):
    """The transformers tokenizer of `family` (PreTrainedTokenizerFast over byte_level_bpe), with its template."""
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(family), bos_token=spec["bos"],
                                        eos_token=spec["eos"])
    template = spec["template"]
    if template is None:
        fixtures = Path(__file__).parent / "fixtures" / "chat" / "templates.json"
        template = json.loads(fixtures.read_text(encoding="utf-8"))["qwen2.5"]["chat_template"]
    tokenizer.chat_template = template
    return tokenizer


def printable(tokenizer, token_id: int) -> bool:
    """Whether a token decodes to printable ASCII (the special tokens count as printable)."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    return text.isascii() and (text.isprintable() or set(text) <= {" ", "\n"})


def hf_model(family: str, vocab_size: int, tokenizer, seed: int = 0, std: float = 0.2):
    """A random transformers model (eager attention), weights spread wider than its init and RMSNorm gains near 1.
    LM head rows of tokens that are not printable ASCII are zeroed (a zero logit never wins greedy decoding, so the
    greedy text reads back exactly); the EOS rows are scaled by EOS_SCALE."""
    import transformers

    spec = FAMILIES[family]
    name = {"llama": "Llama", "qwen2": "Qwen2"}[family]
    config_cls, model_cls = getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")
    bos = None if spec["bos"] is None else tokenizer.convert_tokens_to_ids(spec["bos"])
    model = model_cls(config_cls(vocab_size=vocab_size, bos_token_id=bos, attn_implementation="eager",
                                 eos_token_id=tokenizer.convert_tokens_to_ids(spec["eos"]), **SIZES))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if pname.endswith("norm.weight") else 0.0))
        for token_id in range(vocab_size):
            if not printable(tokenizer, token_id):
                model.lm_head.weight[token_id] = 0
        for token in spec["stops"]:
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)] *= EOS_SCALE
    return model.eval()


def stop_ids(family: str, tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(token) for token in FAMILIES[family]["stops"]]


def write_checkpoint(directory: Path, family: str, seed: int = 0, **save_options):
    """config.json, the weights, the tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja) and
    a generation_config.json whose eos_token_id lists the stop ids (as Llama 3 and Qwen2.5 instruct repos do) into
    `directory`; returns (the transformers model, its tokenizer)."""
    tokenizer = hf_tokenizer(family)
    model = hf_model(family, len(tokenizer), tokenizer, seed)
    model.save_pretrained(directory, **save_options)
    tokenizer.save_pretrained(directory)
    generation = {"bos_token_id": model.config.bos_token_id, "eos_token_id": stop_ids(family, tokenizer)}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return model, tokenizer


def hub_repo(repo_id: str, family: str, seed: int = 0, **save_options):
    """write_checkpoint into the offline hub cache as `repo_id` (branch main): (transformers model, its tokenizer)."""
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = write_checkpoint(Path(tmp), family, seed, **save_options)
        put_in_hub_cache(repo_id, Path(tmp))
    return model, tokenizer


@pytest.fixture(scope="module")
def repos():
    """{family: (transformers model, tokenizer)}, both in the hub cache under REPOS."""
    return {family: hub_repo(REPOS[family], family, seed=1) for family in REPOS}


def greedy_reference(model, ids: list[int], max_new_tokens: int, stops: list[int]) -> tuple[list[int], str]:
    """transformers' greedy continuation of `ids` with `stops` as its EOS ids: (the new ids, the stop id left out;
    "stop" or "length")."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    if new and new[-1] in stops:
        return new[:-1], "stop"
    return new, "length"


@pytest.mark.parametrize("family", REPOS)
def test_from_pretrained_loads_the_hub_repo_as_a_llama_with_transformers_logits(repos, family):
    ref, _ = repos[family]
    model = minhub.from_pretrained(REPOS[family])
    assert isinstance(model, Llama) and model.config.model_type == family
    assert model.lm_head.weight.dtype == torch.float32 and model.commit_hash is not None
    idx = torch.randint(0, ref.config.vocab_size, (2, 40))
    with torch.no_grad():
        diff = (model(idx) - ref(idx).logits).abs().max().item()
    assert diff <= TOL, f"max |Δlogit| = {diff}"


@pytest.mark.parametrize("family", REPOS)
def test_eos_ids_come_from_generation_config(repos, family):
    """config.json names one EOS (the template's end of turn); generation_config.json lists every id that ends a
    generation, as Llama 3 and Qwen2.5 instruct repos do: the loaded config takes the list."""
    from huggingface_hub import hf_hub_download

    _, tokenizer = repos[family]
    stops = stop_ids(family, tokenizer)
    assert len(stops) == 2
    config = json.loads(Path(hf_hub_download(REPOS[family], "config.json")).read_text())
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids(FAMILIES[family]["eos"])
    assert minhub.from_pretrained(REPOS[family]).config.eos_token_id == stops


def test_a_sharded_bf16_checkpoint_loads(tmp_path):
    """save_pretrained's shards of a bf16 model (model.safetensors.index.json): float32 by default, with the logits
    of transformers' float32 model loaded from the same files; bf16 when asked."""
    from transformers import LlamaForCausalLM

    tokenizer = hf_tokenizer("llama")
    ref = hf_model("llama", len(tokenizer), tokenizer, seed=2).to(torch.bfloat16)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert not (tmp_path / "model.safetensors").exists() and len(shards) > 2
    put_in_hub_cache("tests/tiny-llama-bf16-shards", tmp_path)
    model = minhub.from_pretrained("tests/tiny-llama-bf16-shards")
    assert isinstance(model, Llama) and model.lm_head.weight.dtype == torch.float32
    ref32 = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    idx = torch.randint(0, len(tokenizer), (2, 24))
    with torch.no_grad():
        assert (model(idx) - ref32(idx).logits).abs().max().item() <= TOL
    model16 = minhub.from_pretrained("tests/tiny-llama-bf16-shards", dtype=torch.bfloat16)
    assert model16.lm_head.weight.dtype == torch.bfloat16


def test_a_model_type_minhub_does_not_implement_is_a_config_error(tmp_path):
    write_checkpoint(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    put_in_hub_cache("tests/tiny-gemma", tmp_path)
    supported = "gpt2, gpt_bigcode, gpt_neox, llama, minhub-gpt4, mistral, qwen2"
    with pytest.raises(minhub.ConfigError, match=rf"'gemma' model.*{supported}"):
        minhub.from_pretrained("tests/tiny-gemma")


def test_missing_and_misshaped_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    write_checkpoint(tmp_path, "llama")
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    put_in_hub_cache("tests/tiny-llama-missing", tmp_path)
    with pytest.raises(minhub.CheckpointError, match=r"missing weights: model\.layers\.1\.mlp\.up_proj\.weight"):
        minhub.from_pretrained("tests/tiny-llama-missing")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(80, 48)
    state["model.norm.weight"] = torch.ones(47)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    put_in_hub_cache("tests/tiny-llama-misshaped", tmp_path)
    with pytest.raises(minhub.CheckpointError, match=r"wrongly shaped weights: model\.norm\.weight \(47,\) "
                                                     r"\(expected \(48,\)\)"):
        minhub.from_pretrained("tests/tiny-llama-misshaped")


TEXTS = ["Hello world", "What is the capital of France?", "  spaced  out\n\nlines ", "日本語 and émigré",
         "<|eot_id|> and <|im_end|> as text", ""]


@pytest.mark.parametrize("family", REPOS)
def test_tokenizer_ids_equal_transformers_autotokenizer(repos, family):
    """minhub's tokenizer (a `tokenizers.Tokenizer` from the repo's tokenizer.json) against transformers'
    AutoTokenizer from the same repo: the same ids, Llama 3's BOS included, and the same text back."""
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(REPOS[family])
    ours = minhub.tokenizer_from_pretrained(REPOS[family])
    bos = FAMILIES[family]["bos"]
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        bos_ids = [theirs.convert_tokens_to_ids(bos)] if bos else []  # Llama 3 prepends its BOS, Qwen2 nothing
        assert ids == bos_ids + ours.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


@pytest.mark.parametrize("prompt, finish", [("Hello", "stop"), ("Once upon a time", "stop"),
                                            ("Tell me a story.", "length")])
def test_cli_generate_prints_the_prompt_and_the_greedy_continuation(repos, prompt, finish, capsys):
    """`minhub generate` with a Llama: the prompt, then what minhub.generate produces greedily (and transformers'
    generate with the same EOS ids), up to the first EOS id of generation_config.json, whichever it is."""
    from minhub.cli import main

    ref, tokenizer = repos["llama"]
    stops = stop_ids("llama", tokenizer)
    assert main(["generate", REPOS["llama"], prompt, "--max-new-tokens", "30", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    model = minhub.from_pretrained(REPOS["llama"])
    ids = minhub.tokenizer_from_pretrained(REPOS["llama"]).encode(prompt).ids
    generated = minhub.generate(model, torch.tensor([ids]), 30, temperature=0,
                                eos_token_id=model.config.eos_token_id)[0, len(ids):].tolist()
    new, reason = greedy_reference(ref, ids, 30, stops)
    assert reason == finish  # what the prompts are chosen for
    assert generated == new + ([generated[-1]] if reason == "stop" else [])
    assert reason == "length" or generated[-1] in stops
    assert out == prompt + tokenizer.decode(new, skip_special_tokens=True) + "\n"


def test_generation_stops_at_any_of_the_eos_ids(repos):
    """Each of generation_config.json's EOS ids ends a greedy generation where transformers' ends it; a batch stops
    once every row has met one of them (a row that is done repeats its first EOS id)."""
    ref, tokenizer = repos["llama"]
    model = minhub.from_pretrained(REPOS["llama"])
    stops = model.config.eos_token_id
    prompts = ["Hello", "Once upon a time"]
    alone = []  # each prompt's continuation, its EOS included
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        new, reason = greedy_reference(ref, ids, 40, stops)
        out = minhub.generate(model, torch.tensor([ids]), 40, temperature=0, eos_token_id=stops)[0, len(ids):]
        assert reason == "stop" and out[:-1].tolist() == new and int(out[-1]) in stops
        alone.append(out.tolist())
    assert sorted(row[-1] for row in alone) == sorted(stops)  # one prompt ends at each of them
    idx, mask = minhub.pad_left([tokenizer(p)["input_ids"] for p in prompts], pad_id=0)
    batch = minhub.generate(model, idx, 40, temperature=0, eos_token_id=stops, attention_mask=mask)
    width = max(len(row) for row in alone)
    assert batch[:, idx.size(1):].tolist() == [row + [stops[0]] * (width - len(row)) for row in alone]


def test_cli_perplexity_equals_transformers_loss(repos, tmp_path, capsys):
    """`minhub perplexity --json` on a Llama: exp of transformers' mean cross-entropy over the tokenized file (BOS
    first, as the tokenizer adds it), every token after BOS scored."""
    from minhub.cli import main

    ref, tokenizer = repos["llama"]
    text = " ".join(CORPUS[:4])
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    assert main(["perplexity", REPOS["llama"], str(tmp_path / "text.txt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    ids = tokenizer(text)["input_ids"]
    assert len(ids) < SIZES["max_position_embeddings"]  # one window
    with torch.no_grad():
        loss = ref(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert result["tokens"] == len(ids) - 1
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_the_precompiled_step_takes_a_gqa_llama_and_gives_transformers_tokens(repos, monkeypatch):
    """The default path's compiled decode step for a Llama (grouped-query attention, rotary frequencies held as a
    plain tensor): built for it, bound to its tensors, its one-query attention through minhub::attend where the
    library is built, and the greedy tokens of transformers."""
    from minhub import hardware, matmul, precompiled

    if not hardware.cpu_info().can_compile:
        pytest.skip(f"the precompiled step needs a C++ compiler; {hardware.cpu_info().describe()}")
    monkeypatch.setenv("MINHUB_DECODE", "compiled")  # the tiny model is far below the size it is built for by default
    ref, tokenizer = repos["llama"]
    model = minhub.from_pretrained(REPOS["llama"])
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    # a long context, as Llama 3.2's 131,072: a short reply sets up 1,024 slots, and the step is built for them
    model.config.max_position_embeddings = 4096
    ids = tokenizer.encode("hello world")
    out = minhub.generate(model, torch.tensor([ids]), 12, temperature=0)  # builds the step (traced: not counted)
    assert model in precompiled._bound and model.cache_len == 1025
    with torch.profiler.profile() as prof:
        assert torch.equal(minhub.generate(model, torch.tensor([ids]), 12, temperature=0), out)
    new, _ = greedy_reference(ref, ids, 12, [])
    assert out[0, len(ids):].tolist() == new
    ran = {event.key: event.count for event in prof.key_averages()}
    if matmul.plan().library is not None:
        assert ran.get("minhub::attend") == 11 * model.config.num_hidden_layers  # every step after the prefill
