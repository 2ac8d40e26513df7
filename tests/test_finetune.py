"""`minhub train --init-from`: fine-tuning starts from the base model's weights, shape and tokenizer (loaded through
the real hub code path from a temporary cache), improves on the new text, loads in transformers, and resumes
exactly."""

import json
import os
import random
import signal
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from helpers import put_in_hub_cache
from safetensors.torch import load_file

from minhub import gpt2_from_pretrained
from minhub.cli import main
from minhub.llama import rope_inv_freq
from minhub.train import Batches, TrainConfig, TrainError, estimate_loss, open_tokens, train

OLD_WORDS = ["the", "king", "queen", "shall", "speak", "to", "thee", "my", "lord", "and", "good", "night", "o"]
NEW_WORDS = ["a", "ship", "sails", "on", "the", "grey", "sea", "at", "dawn", "and", "night"]


def write_corpus(path: Path, words: list[str], seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) + "."
                              for _ in range(1500)))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small character-level GPT-2 trained from scratch on one text, then put in the hub cache as tests/base."""
    root = tmp_path_factory.mktemp("base")
    old = write_corpus(root / "old.txt", OLD_WORDS + NEW_WORDS, 0)  # every character of the new text appears
    train(TrainConfig(data=str(old), out=str(root / "run"), n_layer=2, n_head=2, n_embd=48, block_size=32,
                      batch_size=16, max_steps=120, eval_every=120, eval_steps=2, warmup_steps=5, lr=3e-3,
                      min_lr=3e-4, seed=3))
    put_in_hub_cache("tests/base", root / "run")
    new = write_corpus(root / "new.txt", NEW_WORDS, 1)
    return "tests/base", root / "run", new


def fine_tune(base, out: Path, **overrides) -> TrainConfig:
    name, _, new = base
    settings = dict(data=str(new), out=str(out), init_from=name, block_size=32, batch_size=16, max_steps=60,
                    eval_every=60, eval_steps=4, warmup_steps=0, lr=1e-3, min_lr=1e-4, seed=5)
    return TrainConfig(**{**settings, **overrides})


def val_loss(model, run: Path, config: TrainConfig) -> float:
    """The run's own evaluation (same batches, same seeds) applied to `model`."""
    meta = json.loads((run / "data.json").read_text())
    batches = {split: Batches(run / f"{split}.bin", meta["dtype"], config.block_size, config.batch_size, 0, "cpu")
               for split in ("train", "val")}
    return estimate_loss(model, batches, config.eval_steps, nullcontext, config.seed)["val"]


def test_fine_tuning_starts_at_the_base_and_improves_on_the_new_text(base, tmp_path):
    name, base_run, _ = base
    base_model = gpt2_from_pretrained(name)
    first = fine_tune(base, tmp_path / "first", max_steps=1, eval_every=1, lr=1e-6, min_lr=1e-6)
    after_one_step = train(first)["val_loss"]
    base_loss = val_loss(base_model.train(), tmp_path / "first", first)
    assert abs(after_one_step - base_loss) < 0.02  # the run starts from the base's weights ...
    scratch = train(TrainConfig(**{**vars(first), "init_from": None, "out": str(tmp_path / "scratch"), "n_layer": 2,
                                   "n_head": 2, "n_embd": 48, "tokenizer": str(base_run / "tokenizer.json")}))
    assert scratch["val_loss"] > base_loss + 1.0  # ... not from a fresh model's

    result = train(fine_tune(base, tmp_path / "run"))
    assert result["val_loss"] < base_loss - 0.05  # and learns the new text
    run = tmp_path / "run"
    assert (run / "tokenizer.json").read_text() == (base_run / "tokenizer.json").read_text()
    config = json.loads((run / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["vocab_size"]) == (2, 48, base_model.config.vocab_size)

    from transformers import GPT2LMHeadModel

    ours, theirs = gpt2_from_pretrained(run), GPT2LMHeadModel.from_pretrained(run).eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4
    assert main(["generate", str(run), "the sea", "--max-new-tokens", "8", "--seed", "0"]) == 0


def test_a_cropped_context_and_an_exact_resume(base, tmp_path):
    whole = train(fine_tune(base, tmp_path / "whole", block_size=16, max_steps=12, save_every=6, eval_every=6,
                            dropout=0.1))
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["n_positions"] == 16
    def stop_after_step_4(step, metrics):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would: the run saves step 4 and stops

    with pytest.raises(KeyboardInterrupt):
        train(fine_tune(base, tmp_path / "split", block_size=16, max_steps=12, save_every=6, eval_every=6,
                        dropout=0.1), callback=stop_after_step_4)
    assert torch.load(tmp_path / "split" / "train_state.pt", weights_only=True)["step"] == 4
    resumed = train(TrainConfig(data="unused", out=str(tmp_path / "split"), max_steps=12, save_every=6,
                                eval_every=6, eval_steps=4, resume=True))
    assert resumed == whole
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def record_learning_rates(monkeypatch) -> list[list[float]]:
    """A list that fills, during the next run, with every parameter group's learning rate at every optimizer step
    (read from the optimizer the loop steps, through a step pre-hook on minhub.train.build_optimizer's result)."""
    import minhub.train as train_module

    lrs: list[list[float]] = []
    real_build_optimizer = train_module.build_optimizer

    def build_optimizer(model, config, fused):
        optimizer = real_build_optimizer(model, config, fused)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append([g["lr"] for g in opt.param_groups]))
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", build_optimizer)
    return lrs


NANOGPT_FINE_TUNE_LR = 3e-5  # nanoGPT's config/finetune_shakespeare.py: learning_rate = 3e-5, decay_lr = False


@pytest.mark.parametrize("warmup_steps", [0, None], ids=["no-warmup", "default-warmup"])
def test_a_fine_tune_defaults_to_nanogpts_constant_learning_rate(base, tmp_path, monkeypatch, warmup_steps):
    """Reference: nanoGPT's Shakespeare fine-tune, a constant 3e-5 at every step (no warmup, no decay), for both
    parameter groups, when --lr and --min-lr are not given."""
    lrs = record_learning_rates(monkeypatch)
    train(fine_tune(base, tmp_path / "run", lr=None, min_lr=None, warmup_steps=warmup_steps, max_steps=4,
                    eval_every=4, eval_steps=1))
    assert len(lrs) == 4
    assert [lr for step in lrs for lr in step] == pytest.approx([NANOGPT_FINE_TUNE_LR] * 8, rel=1e-12)


def test_an_unknown_base_is_one_error_before_anything_is_written(base, tmp_path):
    with pytest.raises(TrainError, match="--init-from nobody/missing: .*nobody/missing"):
        train(fine_tune(base, tmp_path / "run", init_from="nobody/missing"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(TrainError, match=r"block_size must be in \[2, 32\] \(the context of tests/base\), got 64"):
        train(fine_tune(base, tmp_path / "run", block_size=64))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, message", [
    (["--n-layer", "4"], "--n-layer come from the base model with --init-from: drop them"),
    (["--model", "gpt4", "--n-embd", "64"], "--model, --n-embd come from the base model"),
    ([], "--init-from nobody/missing"),
])
def test_cli_init_from_errors_are_one_line_and_exit_2(base, tmp_path, capsys, options, message):
    name = "nobody/missing" if not options else base[0]
    code = main(["train", "--data", str(base[2]), "--out", str(tmp_path / "run"), "--init-from", name, *options])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_revision_needs_init_from(tmp_path, capsys):
    assert main(["train", "--data", "x.txt", "--out", str(tmp_path / "run"), "--revision", "main"]) == 2
    assert "--revision is the revision of --init-from" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# A Llama-family base: any model minhub.from_pretrained loads fine-tunes the same way

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    """A small random transformers LlamaForCausalLM (tied embeddings, grouped-query attention, Llama 3.1's RoPE
    scaling) with a real byte-level BPE tokenizer trained on the new text (it adds a BOS, as Llama 3's does), saved by
    transformers and put in the hub cache as tests/llama-base."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("llama")
    text = write_corpus(root / "new.txt", NEW_WORDS, 1)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([str(text)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|begin|>", "<|end|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = tokenizer.token_to_id("<|begin|>"), tokenizer.token_to_id("<|end|>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", bos)])
    base_dir = root / "base"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin|>", eos_token="<|end|>").save_pretrained(
        base_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        rope_parameters=LLAMA3_ROPE, bos_token_id=bos, eos_token_id=eos))
    with torch.no_grad():  # weights spread wider than the init, so that logits differ clearly between positions
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if name.endswith("norm.weight") else 0.0))
    model.save_pretrained(base_dir)
    put_in_hub_cache("tests/llama-base", base_dir)
    return "tests/llama-base", base_dir, text, bos


def llama_fine_tune(llama_base, out: Path, **overrides) -> TrainConfig:
    name, _, text, _ = llama_base
    settings = dict(data=str(text), out=str(out), init_from=name, block_size=32, batch_size=8, max_steps=12,
                    eval_every=12, eval_steps=2, lr=3e-3, min_lr=3e-3, seed=7)
    return TrainConfig(**{**settings, **overrides})


def test_fine_tuning_a_llama_checkpoint_loads_in_transformers_and_minhub(llama_base, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from minhub import from_pretrained

    _, base_dir, _, bos = llama_base
    losses: list[float] = []
    config = llama_fine_tune(llama_base, tmp_path / "run")
    train(config, callback=lambda step, metrics: losses.append(metrics["loss"]))
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["model"] == "llama"

    # the first step's loss is transformers' loss of the base on the same batch (the run's first batch, drawn again)
    meta = json.loads((run / "data.json").read_text())
    x, y = Batches(run / "train.bin", meta["dtype"], config.block_size, config.batch_size, config.seed, "cpu").next()
    block = torch.cat((x, y[:, -1:]), dim=1)  # x and its next tokens: transformers shifts the labels itself
    with torch.no_grad():
        reference = LlamaForCausalLM.from_pretrained(base_dir)(block, labels=block).loss.item()
    assert abs(losses[0] - reference) < 1e-5
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0  # and the loss goes down
    assert bos not in open_tokens(run / "train.bin", meta["dtype"]).tolist()  # one stream of text, no BOS per chunk

    # the run holds the base's tokenizer files, byte for byte, and a model transformers and minhub load alike
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (run / name).read_bytes() == (base_dir / name).read_bytes(), name
    assert "lm_head.weight" not in load_file(run / "model.safetensors")  # tied: stored once, as transformers does
    theirs, ours = AutoModelForCausalLM.from_pretrained(run).eval(), from_pretrained(run)
    assert isinstance(theirs, LlamaForCausalLM)
    assert theirs.config.rope_parameters == LLAMA3_ROPE and theirs.config.max_position_embeddings == 64
    assert (theirs.model.rotary_emb.inv_freq == rope_inv_freq(ours.config)).all()
    idx = torch.randint(0, ours.config.vocab_size, (2, 48))  # past block_size: the run keeps the base's context
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir)(idx).logits
        assert (ours(idx) - base_logits).abs().max().item() > 1e-2  # trained: not the base's weights
    assert main(["generate", str(run), "the sea", "--max-new-tokens", "8", "--seed", "0"]) == 0


def test_a_llama_fine_tune_resumes_exactly(llama_base, tmp_path):
    whole = train(llama_fine_tune(llama_base, tmp_path / "whole", max_steps=6, eval_every=3))

    def stop_after_step_2(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train(llama_fine_tune(llama_base, tmp_path / "split", max_steps=6, eval_every=3), callback=stop_after_step_2)
    resumed = train(TrainConfig(data="unused", out=str(tmp_path / "split"), max_steps=6, eval_every=3, eval_steps=2,
                                resume=True))
    assert resumed == whole
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family, options", [
    ("llama", dict(attention_bias=True, mlp_bias=True, rope_parameters={"rope_type": "linear", "factor": 2.0})),
    ("qwen2", dict(tie_word_embeddings=True, rope_parameters={"rope_theta": 1e6})),
    ("mistral", dict(sliding_window=24)),
])
def test_save_pretrained_writes_what_transformers_reads(tmp_path, family, options):
    """hub.save_pretrained for each Llama-family model: transformers' class, config and logits, and minhub's."""
    from transformers import AutoModelForCausalLM

    from minhub import from_pretrained
    from minhub.hub import save_pretrained
    from minhub.llama import ARCHITECTURES, Llama, LlamaConfig

    config = LlamaConfig(model_type=family, vocab_size=71, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2, **options)
    model = Llama(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_pretrained(model, tmp_path)
    theirs, ours = AutoModelForCausalLM.from_pretrained(tmp_path).eval(), from_pretrained(tmp_path)
    assert type(theirs).__name__ == ARCHITECTURES[family]
    assert theirs.config.rope_parameters == config.rope_parameters
    assert ours.config == config
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) != config.tie_word_embeddings
    idx = torch.randint(0, 71, (2, 20))
    with torch.no_grad():
        assert (theirs(idx).logits - model(idx)).abs().max().item() <= 1e-5
        assert torch.equal(ours(idx), model(idx))


@pytest.mark.parametrize("family", ["gpt_neox", "gpt_bigcode"])
def test_the_other_families_fine_tune_and_load_in_transformers(llama_base, tmp_path, family):
    """A GPT-NeoX and a GPT-BigCode base (transformers' own, saved to the hub cache with the Llama base's tokenizer)
    fine-tune through the same path; the run loads in transformers with minhub's logits."""
    import shutil

    import transformers

    from minhub import from_pretrained

    _, llama_dir, text, _ = llama_base
    vocab = from_pretrained(llama_dir).config.vocab_size
    config = (transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5)
              if family == "gpt_neox" else
              transformers.GPTBigCodeConfig(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_dir / name, base_dir / name)
    put_in_hub_cache(f"tests/{family}-base", base_dir)
    run = tmp_path / "run"
    train(TrainConfig(data=str(text), out=str(run), init_from=f"tests/{family}-base", block_size=32, batch_size=4,
                      max_steps=3, eval_every=3, eval_steps=1, lr=3e-3, min_lr=3e-3, seed=7))
    theirs, ours = transformers.AutoModelForCausalLM.from_pretrained(run).eval(), from_pretrained(run)
    assert type(ours).__name__ == ("GPTNeoX" if family == "gpt_neox" else "GPTBigCode")
    idx = torch.randint(0, vocab, (2, 20))
    with torch.no_grad():
        assert (theirs(idx).logits - ours(idx)).abs().max().item() <= 1e-4
