"""Training from scratch: it learns, resumes exactly, saves loadable checkpoints, and refuses bad inputs."""

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minhub import GPT4, generate, gpt2_from_pretrained, tokenizer_from_pretrained
from minhub.train import TrainConfig, TrainError, train

REPO_ROOT = Path(__file__).parents[1]
WORDS = ["the", "king", "queen", "shall", "speak", "to", "thee", "my", "lord", "and", "good", "night", "o"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Sentences of random words: characters within a word are predictable, word choice is not."""
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + "." for _ in range(2500))
    path = tmp_path_factory.mktemp("data") / "input.txt"
    path.write_text(text)
    return path


def tiny(corpus: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(data=str(corpus), out=str(out), n_layer=2, n_head=2, n_embd=48, block_size=32, batch_size=16,
                    max_steps=40, eval_every=20, eval_steps=4, warmup_steps=5, lr=3e-3, min_lr=3e-4, seed=7,
                    dim_head=24)
    return TrainConfig(**{**settings, **overrides})


def unigram_entropy(path: Path) -> float:
    counts = Counter(path.read_text())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


@pytest.mark.parametrize("model", ["gpt2", "gpt4"])
def test_validation_loss_falls_clearly_below_the_unigram_baseline(corpus, tmp_path, model):
    baseline = unigram_entropy(corpus)  # the best loss without looking at context, in nats per character
    result = train(tiny(corpus, tmp_path / "run", model=model, max_steps=150, eval_every=75, dropout=0.0))
    assert result["step"] == 150
    assert result["val_loss"] < baseline - 0.5, (result, baseline)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [75, 150] and log[1]["val_loss"] < log[0]["val_loss"]


# dropout and gradient accumulation: random state and half-finished steps that a bad stop would show
EXACT = dict(dropout=0.1, grad_accum=2, save_every=10, eval_every=15)


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    return train(tiny(corpus, run, **EXACT)), load_file(run / "model.safetensors")


def _signal_self(times: int = 1) -> None:
    for _ in range(times):
        signal.raise_signal(signal.SIGTERM)  # the handler runs before raise_signal returns


@pytest.mark.parametrize("moment, saved_step", [
    ("forward", 14),  # second micro-batch of step 14: the step is finished, then saved
    ("between backward and the optimizer step", 15),
    ("eval", 15),  # the evaluation after step 15 runs to its end
    ("periodic save", 10),  # the save of step 10 completes; the run stops before step 11
    ("second signal during a save", 10),  # stops at once inside the save of step 20: step 10 stays the checkpoint
])
def test_a_signal_at_any_moment_stops_at_a_step_boundary_and_resumes_bit_for_bit(
        corpus, tmp_path, monkeypatch, uninterrupted, moment, saved_step):
    import safetensors.torch

    import minhub.train as train_module

    calls = Counter()

    def build_model(config, vocab_size):
        model = real_build_model(config, vocab_size)

        def before_forward(module, args):
            calls["train" if module.training else "eval"] += 1
            if (moment == "forward" and module.training and calls["train"] == 2 * 13 + 2) or \
                    (moment == "eval" and not module.training and calls["eval"] == 1):
                _signal_self()

        model.register_forward_pre_hook(before_forward)
        return model

    def build_optimizer(model, config, fused):
        optimizer = real_build_optimizer(model, config, fused)

        def before_step(optimizer, args, kwargs):
            calls["step"] += 1
            if moment == "between backward and the optimizer step" and calls["step"] == 15:
                _signal_self()

        optimizer.register_step_pre_hook(before_step)
        return optimizer

    def save_file(tensors, filename, metadata=None):
        calls["save"] += 1
        real_save_file(tensors, filename, metadata)
        if moment == "periodic save" and calls["save"] == 1:
            _signal_self()
        if moment == "second signal during a save" and calls["save"] == 2:
            _signal_self(times=2)

    real_build_model, real_build_optimizer = train_module.build_model, train_module.build_optimizer
    real_save_file = safetensors.torch.save_file
    monkeypatch.setattr(train_module, "build_model", build_model)
    monkeypatch.setattr(train_module, "build_optimizer", build_optimizer)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    run = tmp_path / "run"
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(corpus, run, **EXACT))
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the run's handler is gone again
    assert torch.load(run / "train_state.pt", weights_only=True)["step"] == saved_step
    monkeypatch.undo()

    resumed = train(TrainConfig(data=str(corpus), out=str(run), max_steps=40, eval_every=15, eval_steps=4,
                                resume=True))
    straight, straight_weights = uninterrupted
    assert resumed == straight
    weights = load_file(run / "model.safetensors")
    assert weights.keys() == straight_weights.keys()
    assert all(torch.equal(weights[k], straight_weights[k]) for k in weights)


def test_a_trained_gpt2_loads_with_from_pretrained_and_in_transformers(corpus, tmp_path):
    from transformers import GPT2LMHeadModel

    train(tiny(corpus, tmp_path / "run", max_steps=10))
    model = gpt2_from_pretrained(tmp_path / "run")
    tokenizer = tokenizer_from_pretrained(tmp_path / "run")
    idx = torch.tensor([tokenizer.encode("the king").ids])
    out = generate(model, idx, 20, temperature=0)
    assert tokenizer.decode(out[0].tolist()).startswith("the king")
    ref = GPT2LMHeadModel.from_pretrained(tmp_path / "run").eval()  # the reference reads our files too
    with torch.no_grad():
        assert (model(idx) - ref(idx).logits).abs().max().item() <= 1e-4


def test_a_trained_gpt4_loads_and_the_cli_generates_from_it(corpus, tmp_path):
    train(tiny(corpus, tmp_path / "run", model="gpt4", max_steps=10))
    model = GPT4.from_pretrained(tmp_path / "run")
    assert model.generate(torch.tensor([[1, 2, 3]]), 5, temperature=0).shape == (1, 5)
    result = subprocess.run([sys.executable, "-m", "minhub", "generate", str(tmp_path / "run"), "the ",
                             "--max-new-tokens", "12", "--seed", "0"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the ") and len(result.stdout) == len("the ") + 12 + 1


def test_cli_train_then_generate_then_plot(corpus, tmp_path):
    run = tmp_path / "run"
    args = ["--data", str(corpus), "--out", str(run), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
            "--block-size", "32", "--batch-size", "8", "--max-steps", "12", "--eval-every", "6", "--eval-steps", "2"]
    result = subprocess.run([sys.executable, "-m", "minhub", "train", *args], capture_output=True, text=True,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert "step 12: train loss" in result.stdout + result.stderr
    result = subprocess.run([sys.executable, "-m", "minhub", "generate", str(run), "the ", "--max-new-tokens", "10"],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0 and result.stdout.startswith("the "), result.stderr
    pytest.importorskip("matplotlib")
    result = subprocess.run([sys.executable, "-m", "minhub", "plot", str(run)], capture_output=True, text=True,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny(corpus, run, max_steps=10, save_every=5))
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir() if p.is_file()}

    import safetensors.torch

    real = safetensors.torch.save_file

    def crash_half_way(tensors, filename, metadata=None):
        real(tensors, filename, metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)  # a half-written file, then the machine dies
        raise SystemExit("power cut")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_half_way)
    with pytest.raises(SystemExit):
        train(TrainConfig(out=str(run), data=str(corpus), max_steps=20, eval_every=20, resume=True))
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir() if p.is_file()}
    assert after["model.safetensors"] == before["model.safetensors"]
    assert after["train_state.pt"] == before["train_state.pt"]
    gpt2_from_pretrained(run)  # still loads
    assert train(TrainConfig(out=str(run), data=str(corpus), max_steps=12, eval_every=12, eval_steps=2,
                             resume=True))["step"] == 12


def test_a_killed_run_saves_and_resumes(corpus, tmp_path):
    import time

    run = tmp_path / "run"
    args = ["--data", str(corpus), "--out", str(run), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
            "--block-size", "32", "--batch-size", "8", "--max-steps", "100000", "--eval-every", "50",
            "--eval-steps", "2", "--save-every", "1000000"]
    process = subprocess.Popen([sys.executable, "-m", "minhub", "train", *args], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "log.jsonl").exists() and time.time() < deadline:  # wait for real progress (step 50)
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # what `kill` sends
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "stopped by SIGTERM after step" in out + err
    step = torch.load(run / "train_state.pt", weights_only=True)["step"]
    assert step >= 50  # no periodic save happened: this is the SIGTERM save
    gpt2_from_pretrained(run)
    resumed = train(TrainConfig(data=str(corpus), out=str(run), max_steps=step + 5, eval_every=1000,
                                eval_steps=2, resume=True))
    assert resumed["step"] == step + 5


def test_distributed_data_parallel_with_two_cpu_processes(corpus, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "minhub", "train", "--data", str(corpus), "--out", str(run), "--n-layer", "1", "--n-head", "2",
         "--n-embd", "32", "--block-size", "32", "--batch-size", "8", "--max-steps", "30", "--eval-every", "15",
         "--eval-steps", "2", "--warmup-steps", "3", "--lr", "3e-3"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout + result.stderr
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [15, 30]  # only rank 0 logs
    assert log[-1]["val_loss"] < unigram_entropy(corpus)
    gpt2_from_pretrained(run)


# --- bad inputs ---------------------------------------------------------------------------------------------------


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(TrainError, match="does not exist"):
        train(TrainConfig(data=str(tmp_path / "nope.txt"), out=str(tmp_path / "run")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(TrainError, match="is empty"):
        train(TrainConfig(data=str(tmp_path / "empty.txt"), out=str(tmp_path / "run")))


def test_block_size_larger_than_the_data(tmp_path):
    (tmp_path / "small.txt").write_text("to be or not to be " * 20)
    with pytest.raises(TrainError, match="each split needs more than block_size=256"):
        train(TrainConfig(data=str(tmp_path / "small.txt"), out=str(tmp_path / "run"), block_size=256))


def test_vocabulary_too_large_for_the_token_file(tmp_path):
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 20000)] + [chr(c) for c in range(0x20000, 0x20000 + 46000)]
    (tmp_path / "many.txt").write_text("".join(chars) * 2)
    with pytest.raises(TrainError, match="66,000 tokens, too many for a uint16 token file"):
        train(TrainConfig(data=str(tmp_path / "many.txt"), out=str(tmp_path / "run"), token_dtype="uint16"))


def test_an_output_directory_holding_another_run_is_not_overwritten(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny(corpus, run, max_steps=4, eval_every=4))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(TrainError, match=r"different model \(n_layer: 2 there, 3 asked"):
        train(tiny(corpus, run, n_layer=3))
    with pytest.raises(TrainError, match="already holds a trained model: pass --resume"):
        train(tiny(corpus, run))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    with pytest.raises(TrainError, match="no train_state.pt to resume from"):
        train(tiny(corpus, tmp_path / "fresh", resume=True))
