"""Training from scratch: it learns, resumes exactly, saves loadable checkpoints, and refuses bad inputs; and its
optimisation (learning-rate schedule, weight-decay groups, gradient accumulation, clipping, DDP) equals references
written here from the formulas, with plain PyTorch, never with values minhub's own code produced."""

import copy
import hashlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from minhub import GPT4, generate, gpt2_from_pretrained, tokenizer_from_pretrained
from minhub.train import TrainConfig, TrainError, learning_rate, train

REPO_ROOT = Path(__file__).parents[1]
TESTS_DIR = Path(__file__).parent
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


# --- references: what training should do, written from the formulas with plain PyTorch ------------------------------


def documented_lr(step: int, config: TrainConfig) -> float:
    """The schedule minhub documents ("linear warmup to lr, then cosine decay to min_lr at max_steps"), from the
    formula: step s < warmup_steps trains at lr * (s + 1) / warmup_steps, so the last warmup step is at the full lr
    (nanoGPT's get_lr uses (s + 1) / (warmup + 1) instead); from step warmup_steps the rate follows half a cosine from
    lr down to min_lr, reached at step max_steps, and stays at min_lr after it."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / (config.max_steps - config.warmup_steps))
    return config.min_lr + (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress)) / 2


def nanogpt_decays(name: str, param: torch.Tensor) -> bool:
    """nanoGPT's configure_optimizers: a parameter with dim >= 2 (weight matrices, embeddings) decays, biases and
    LayerNorm/RMSNorm gains (dim < 2) do not. One documented exception ("never on ... QK-norm scales"): the GPT4
    decoder's per-head q_scale / k_scale, which are 3-D."""
    return param.dim() >= 2 and not name.endswith(("q_scale", "k_scale"))


def plain_pytorch_training(model, steps: list[list[tuple]], config: TrainConfig) -> dict:
    """The reference: train `model` in place with plain PyTorch, one optimizer step per entry of `steps` (a list of
    micro-batches (x, y), whose mean losses are averaged): torch.optim.AdamW with nanogpt_decays' two groups,
    documented_lr set before each step, the gradient norm clipped to config.grad_clip when that is > 0. Returns the
    gradients the optimizer stepped with (after clipping) and the norms before clipping."""
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if nanogpt_decays(n, p)], "weight_decay": config.weight_decay},
              {"params": [p for n, p in named if not nanogpt_decays(n, p)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))
    record = {"grads": [], "norms": []}
    model.train()
    for step, micro_batches in enumerate(steps):
        for group in optimizer.param_groups:
            group["lr"] = documented_lr(step, config)
        for x, y in micro_batches:
            (F.cross_entropy(model(x).flatten(0, 1), y.flatten()) / len(micro_batches)).backward()
        if config.grad_clip > 0:
            record["norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).item())
        record["grads"].append({n: p.grad.clone() for n, p in named})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return record


class TrainingRecorder:
    """What minhub's training loop did, seen by wrapping minhub.train's build_model, build_optimizer and Batches with
    `patch` (monkeypatch.setattr in a test, setattr in a DDP worker): the model (and a copy of its initial weights),
    the optimizer it steps, and at every optimizer step each group's learning rate and the gradients; plus the batches
    drawn while the model is in training mode (evaluation batches are drawn in eval mode)."""

    def __init__(self, patch) -> None:
        import minhub.train as train_module

        self.model = self.initial_model = self.optimizer = None
        self.batches, self.lrs, self.grads = [], [], []
        real_build_model, real_build_optimizer = train_module.build_model, train_module.build_optimizer
        recorder = self

        def build_model(config, vocab_size):
            recorder.model = real_build_model(config, vocab_size)
            recorder.initial_model = copy.deepcopy(recorder.model)
            return recorder.model

        def build_optimizer(model, config, fused):
            recorder.optimizer = real_build_optimizer(model, config, fused)
            recorder.optimizer.register_step_pre_hook(recorder._before_step)
            return recorder.optimizer

        class RecordingBatches(train_module.Batches):
            def next(self):
                x, y = super().next()
                if recorder.model is not None and recorder.model.training:
                    recorder.batches.append((x.clone(), y.clone()))
                return x, y

        patch(train_module, "build_model", build_model)
        patch(train_module, "build_optimizer", build_optimizer)
        patch(train_module, "Batches", RecordingBatches)

    def _before_step(self, optimizer, args, kwargs) -> None:
        self.lrs.append([group["lr"] for group in optimizer.param_groups])
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})

    def steps(self, grad_accum: int) -> list[list[tuple]]:
        """The recorded batches grouped by optimizer step."""
        return [self.batches[i:i + grad_accum] for i in range(0, len(self.batches), grad_accum)]


def assert_close_tensors(actual: dict, expected: dict, atol: float, rtol: float = 0.0, what: str = "weights"):
    """Every tensor of `expected` is in `actual` and matches it; the message names the worst one."""
    assert actual.keys() >= expected.keys(), sorted(expected.keys() - actual.keys())
    errors = {k: (actual[k].float() - expected[k].float()).abs().max().item() for k in expected}
    worst = max(errors, key=errors.get)
    bad = [k for k in expected if not torch.allclose(actual[k].float(), expected[k].float(), atol=atol, rtol=rtol)]
    assert not bad, f"{what} differ from the reference: {len(bad)} tensors, worst {worst} by {errors[worst]:.3g}"


# Weights reached in a different order of float operations (accumulated vs one batch, DDP vs one process) match the
# reference to about 2e-6, not to rounding: the key biases of GPT-2's c_attn get only rounding-noise gradients (softmax
# ignores them) and Adam scales that noise up. The defects these tests target move weights by 1e-4 or more.
REORDERED_ATOL = 1e-5


def parameters(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters()}


def free_port() -> int:
    """A TCP port nobody listens on now: the one the OS picks for port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bounded(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group, all of which is ended if it runs past `timeout` (a hang guard:
    torchrun's workers would otherwise outlive it)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts its workers in sessions of their own, out of killpg's reach (a SIGKILLed torchrun leaves
        # them hung, holding the pipes open): SIGTERM makes torchrun end them, with SIGKILL after its grace period
        os.killpg(process.pid, signal.SIGTERM)
        try:
            out, err = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            err = "(no output: killed)"
        pytest.fail(f"{command[:4]} hung for {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


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
    """from_pretrained gives back the trained weights (train_state.pt's); greedy generation, in Python and from the
    CLI, equals the reference: the argmax of the model's full forward pass, one token at a time (no cache)."""
    run = tmp_path / "run"
    train(tiny(corpus, run, model="gpt4", max_steps=10))
    model = GPT4.from_pretrained(run).eval()
    trained = torch.load(run / "train_state.pt", weights_only=True)["model"]
    assert_close_tensors(model.state_dict(), trained, atol=0, what="the loaded weights")
    tokenizer = tokenizer_from_pretrained(run)
    prompt = torch.tensor([tokenizer.encode("the ").ids])
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(prompt, 12, temperature=0), ids[:, prompt.shape[1]:])
    result = subprocess.run([sys.executable, "-m", "minhub", "generate", str(run), "the ", "--max-new-tokens", "12",
                             "--temperature", "0"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokenizer.decode(ids[0].tolist()) + "\n"


def test_cli_train_then_generate_then_plot(corpus, tmp_path):
    run = tmp_path / "run"
    args = ["--data", str(corpus), "--out", str(run), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
            "--block-size", "32", "--batch-size", "8", "--max-steps", "12", "--eval-every", "6", "--eval-steps", "2"]
    result = subprocess.run([sys.executable, "-m", "minhub", "train", *args], capture_output=True, text=True,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 12  # the printed evaluation is the logged one
    printed = f"step 12: train loss {last['train_loss']:.4f}, val loss {last['val_loss']:.4f}"
    assert printed in result.stdout + result.stderr
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
    """SIGTERM from outside (what `kill` sends): the CLI finishes the step under way, saves that step and says which,
    exits 130, and the run resumes from it."""
    import re
    import time

    run = tmp_path / "run"
    args = ["--data", str(corpus), "--out", str(run), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
            "--block-size", "32", "--batch-size", "8", "--max-steps", "100000", "--eval-every", "5",
            "--eval-steps", "2", "--save-every", "1000000"]
    process = subprocess.Popen([sys.executable, "-m", "minhub", "train", *args], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        hang_guard = time.monotonic() + 300  # not a speed requirement: only a bound on a run that never starts
        while not (run / "log.jsonl").exists():  # the first evaluation (step 5): training is under way
            assert process.poll() is None and time.monotonic() < hang_guard, process.communicate()[1][-3000:]
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 130, err[-3000:]
    said = re.search(r"stopped by SIGTERM after step (\d+)", out + err)
    state = torch.load(run / "train_state.pt", weights_only=True)
    step = state["step"]
    assert said is not None and int(said.group(1)) == step  # no periodic save: this is the SIGTERM save
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(5, step + 1, 5))  # every evaluation up to it, none after
    assert_close_tensors(gpt2_from_pretrained(run).state_dict(), state["model"], atol=0, what="the saved model")
    resumed = train(TrainConfig(data=str(corpus), out=str(run), max_steps=step + 5, eval_every=1000,
                                eval_steps=2, resume=True))
    assert resumed["step"] == step + 5
    assert torch.load(run / "train_state.pt", weights_only=True)["step"] == step + 5


# --- the optimisation, against the references above ----------------------------------------------------------------


def test_the_learning_rate_at_chosen_steps_is_the_documented_schedule():
    """Reference: values worked out by hand from the documented formula (lr 1e-3 to min_lr 1e-4, warmup 10 steps,
    max_steps 110: the cosine spans steps 10 to 110)."""
    config = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    expected = {
        0: 1e-4,  # first warmup step: lr / 10
        4: 5e-4,  # half way through the warmup
        9: 1e-3,  # last warmup step: the full lr
        10: 1e-3,  # the cosine starts at lr
        35: 8.681980515339464e-4,  # a quarter of the cosine: 1e-4 + 9e-4 * (1 + cos(pi / 4)) / 2
        60: 5.5e-4,  # half way: the mean of lr and min_lr
        85: 2.3180194846605365e-4,  # three quarters: 1e-4 + 9e-4 * (1 - cos(pi / 4)) / 2
        110: 1e-4,  # max_steps: min_lr
        150: 1e-4,  # past max_steps: stays at min_lr
    }
    assert {s: learning_rate(s, config) for s in expected} == pytest.approx(expected, rel=1e-12)
    assert {s: documented_lr(s, config) for s in expected} == pytest.approx(expected, rel=1e-12)  # the reference
    no_warmup = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, max_steps=100)
    assert [learning_rate(s, no_warmup) for s in (0, 50, 100)] == pytest.approx([1e-3, 5.5e-4, 1e-4], rel=1e-12)
    constant = TrainConfig(lr=3e-5, min_lr=3e-5, warmup_steps=0, max_steps=20)  # a fine-tune's lr = min_lr
    assert [learning_rate(s, constant) for s in range(20)] == pytest.approx([3e-5] * 20, rel=1e-12)


# accumulation, warmup, cosine and clipping (grad_clip well below the gradient norm) all take part
RECORDED = dict(batch_size=4, grad_accum=2, max_steps=6, warmup_steps=2, grad_clip=0.25, dropout=0.0, eval_every=6,
                eval_steps=1)


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def recorded_run(request, corpus, tmp_path_factory):
    """A short minhub run with a TrainingRecorder: (config, recorder)."""
    config = tiny(corpus, tmp_path_factory.mktemp("recorded") / "run", model=request.param, **RECORDED)
    with pytest.MonkeyPatch.context() as patch:
        recorder = TrainingRecorder(patch.setattr)
        train(config)
    return config, recorder


def test_the_loop_sets_the_documented_learning_rate_in_every_group_at_every_step(recorded_run):
    """Reference: documented_lr, the formula written in this file."""
    config, recorder = recorded_run
    assert len(recorder.lrs) == config.max_steps
    for step, lrs in enumerate(recorder.lrs):
        assert lrs == pytest.approx([documented_lr(step, config)] * len(lrs), rel=1e-12), f"step {step}"


def test_weight_decay_groups_are_nanogpts(recorded_run):
    """Reference: nanogpt_decays (dim >= 2 decays at config.weight_decay, biases and norm gains at 0), checked by
    parameter identity on the optimizer the loop stepped: each model parameter exactly once, nothing else."""
    config, recorder = recorded_run
    name_of = {id(p): n for n, p in recorder.model.named_parameters()}
    decay_of = {}
    for group in recorder.optimizer.param_groups:
        assert group["betas"] == (config.beta1, config.beta2)
        for p in group["params"]:
            name = name_of.get(id(p), f"a tensor of shape {tuple(p.shape)} that is not a model parameter")
            assert name not in decay_of, f"{name} is in two groups"
            decay_of[name] = group["weight_decay"]
    expected = {n: config.weight_decay if nanogpt_decays(n, p) else 0.0 for n, p in recorder.model.named_parameters()}
    assert config.weight_decay == 0.1 and set(expected.values()) == {0.1, 0.0}  # both kinds are there
    assert decay_of == expected


def test_the_training_loop_equals_plain_pytorch(recorded_run):
    """Reference: plain_pytorch_training (torch.optim.AdamW, nanoGPT's groups, documented_lr, clipping, the loss
    averaged over micro-batches) from the same initial weights on the same batches."""
    config, recorder = recorded_run
    steps = recorder.steps(config.grad_accum)
    assert len(steps) == config.max_steps and {len(s) for s in steps} == {config.grad_accum}
    reference = copy.deepcopy(recorder.initial_model)
    record = plain_pytorch_training(reference, steps, config)
    assert max(record["norms"]) > config.grad_clip  # the clipping took part
    for step in range(config.max_steps):
        assert_close_tensors(recorder.grads[step], record["grads"][step], atol=1e-7, rtol=1e-4,
                             what=f"step {step + 1}'s gradients")
    assert_close_tensors(parameters(recorder.model), parameters(reference), atol=1e-6)


def test_two_micro_batches_of_b_equal_one_batch_of_2b(corpus, tmp_path, monkeypatch):
    """grad_accum=2 with batch_size=4 against the reference: plain PyTorch on the same 8 sequences as one batch,
    from the same initial weights. The gradients are compared before the optimizer sees them (no clipping), since
    Adam and clipping would hide a wrong scale."""
    config = tiny(corpus, tmp_path / "run", batch_size=4, grad_accum=2, grad_clip=0.0, max_steps=2, warmup_steps=1,
                  eval_every=2, eval_steps=1, dropout=0.0)
    recorder = TrainingRecorder(monkeypatch.setattr)
    train(config)
    one_batch_of_2b = [[tuple(torch.cat(parts) for parts in zip(*micro_batches))]
                       for micro_batches in recorder.steps(config.grad_accum)]
    assert [len(step[0][0]) for step in one_batch_of_2b] == [8, 8]
    reference = copy.deepcopy(recorder.initial_model)
    record = plain_pytorch_training(reference, one_batch_of_2b, config)
    for step in range(2):
        assert_close_tensors(recorder.grads[step], record["grads"][step], atol=1e-7, rtol=1e-4,
                             what=f"step {step + 1}'s gradients")
    assert_close_tensors(parameters(recorder.model), parameters(reference), atol=REORDERED_ATOL)


DDP_WORKER = '''"""One process of a torchrun run: minhub.train.train(TrainConfig(**json argv[1])) under a
TrainingRecorder, then its initial and final weights and its training batches saved to argv[2]/rank<RANK>.pt."""
import json
import os
import sys

import torch

sys.path.insert(0, {tests!r})
import minhub.train as train_module
from test_train import TrainingRecorder, parameters

recorder = TrainingRecorder(setattr)
train_module.train(train_module.TrainConfig(**json.loads(sys.argv[1])))
torch.save({{"initial": parameters(recorder.initial_model), "final": parameters(recorder.model),
            "batches": recorder.batches, "grads": recorder.grads}},
           os.path.join(sys.argv[2], f"rank{{os.environ['RANK']}}.pt"))
'''


def test_ddp_processes_end_identical_and_equal_one_process_on_the_combined_batch(corpus, tmp_path):
    """Two gloo processes under torchrun (a free port) with gradient accumulation. Reference: plain_pytorch_training
    from rank 0's initial weights (DDP broadcasts them) where each micro-batch is both processes' micro-batches
    together: averaging the processes' gradients is the gradient of the mean loss over the combined batch."""
    run, saved = tmp_path / "ddp", tmp_path / "ranks"
    saved.mkdir()
    settings = dict(data=str(corpus), out=str(run), n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4,
                    grad_accum=2, max_steps=4, warmup_steps=1, lr=3e-3, min_lr=3e-4, grad_clip=1.0, dropout=0.0,
                    eval_every=4, eval_steps=1, seed=7)
    worker = tmp_path / "ddp_worker.py"
    worker.write_text(DDP_WORKER.format(tests=str(TESTS_DIR)))
    result = run_bounded([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), str(worker), json.dumps(settings),
                          str(saved)], timeout=300, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout + result.stderr
    ranks = [torch.load(saved / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # not vacuous: each process drew its own batches and initialised its own weights (seed + rank)
    assert not torch.equal(ranks[0]["batches"][0][0], ranks[1]["batches"][0][0])
    initial_embeddings = [rank["initial"]["transformer.wte.weight"] for rank in ranks]
    assert not torch.equal(*initial_embeddings)
    assert_close_tensors(ranks[1]["final"], ranks[0]["final"], atol=0, what="process 1's weights (against process 0's)")

    config = TrainConfig(**settings)
    ga = config.grad_accum
    combined = [[tuple(torch.cat(parts) for parts in zip(ranks[0]["batches"][i], ranks[1]["batches"][i]))
                 for i in range(step * ga, step * ga + ga)] for step in range(config.max_steps)]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == config.max_steps * ga
    from minhub.train import build_model

    reference = build_model(config, json.loads((run / "data.json").read_text())["vocab_size"])
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(ranks[0]["initial"][name])
    record = plain_pytorch_training(reference, combined, config)
    for step in range(config.max_steps):
        assert_close_tensors(ranks[0]["grads"][step], record["grads"][step], atol=1e-7, rtol=1e-4,
                             what=f"step {step + 1}'s all-reduced and clipped gradients")
    assert_close_tensors(ranks[0]["final"], parameters(reference), atol=REORDERED_ATOL)
    assert_close_tensors(parameters(gpt2_from_pretrained(run)), ranks[0]["final"], atol=0,
                         what="the saved weights")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [4]  # only rank 0 logs


DDP_STOPPING_WORKER = '''"""One process of a torchrun run: minhub.train.train(TrainConfig(**json argv[1])), with
SIGTERM to process 1 after step argv[2] (0: never), which stops every process there."""
import json
import os
import signal
import sys

from minhub.train import TrainConfig, train


def signal_process_1(step, metrics):
    if step == int(sys.argv[2]) and os.environ["RANK"] == "1":
        signal.raise_signal(signal.SIGTERM)


try:
    train(TrainConfig(**json.loads(sys.argv[1])), signal_process_1)
except KeyboardInterrupt:
    print(f"process {os.environ['RANK']} stopped")
'''


def test_a_stopped_ddp_run_resumes_bit_for_bit_and_only_on_as_many_processes(corpus, tmp_path):
    """Two gloo processes with dropout, each drawing its own batches and dropout masks: one run straight to the end,
    one stopped by a SIGTERM to process 1 and resumed with `torchrun ... -m minhub train --resume` in new processes
    (a torchrun launch each: a second train() in the same processes hangs initialising its process group again).
    The resumed run ends with the straight run's weights exactly, which needs every process's own random states in
    the checkpoint (not rank 0's on every process); resuming on another number of processes is refused."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    settings = dict(data=str(corpus), n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, max_steps=6,
                    warmup_steps=1, lr=3e-3, min_lr=3e-4, dropout=0.1, eval_every=6, eval_steps=1, seed=7)
    worker = tmp_path / "ddp_stopping_worker.py"
    worker.write_text(DDP_STOPPING_WORKER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for run, stop_after in ((straight, 0), (stopped, 3)):
        result = run_bounded([*torchrun, "--master_port", str(free_port()), str(worker),
                              json.dumps({**settings, "out": str(run)}), str(stop_after)],
                             timeout=300, cwd=REPO_ROOT, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "stopped by a signal to another process after step 3" in output, output[-3000:]
    assert "process 0 stopped" in output and "process 1 stopped" in output
    state = torch.load(stopped / "train_state.pt", weights_only=True)
    assert state["step"] == 3 and len(state["random_states"]) == 2
    for name in ("rng", "batch_rng"):  # not vacuous: the processes' states differ
        assert not torch.equal(state["random_states"][0][name], state["random_states"][1][name]), name

    result = run_bounded([*torchrun, "--master_port", str(free_port()), "-m", "minhub", "train", "--data",
                          str(corpus), "--out", str(stopped), "--resume", "--max-steps", "6", "--eval-every", "6",
                          "--eval-steps", "1"], timeout=300, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(stopped / "train_state.pt", weights_only=True)["step"] == 6
    assert_close_tensors(load_file(stopped / "model.safetensors"), load_file(straight / "model.safetensors"), atol=0,
                         what="the resumed run's weights (against the uninterrupted run's)")
    last_rows = [json.loads((run / "log.jsonl").read_text().splitlines()[-1]) for run in (straight, stopped)]
    losses = [{k: row[k] for k in ("step", "train_loss", "val_loss")} for row in last_rows]
    assert losses[0] == losses[1] and losses[0]["step"] == 6

    before = {p.name: p.read_bytes() for p in stopped.iterdir() if p.is_file()}
    with pytest.raises(TrainError, match=r"saved by a run of 2 process\(es\).*nproc_per_node 2\), not on 1"):
        train(TrainConfig(data=str(corpus), out=str(stopped), max_steps=8, resume=True))
    assert {p.name: p.read_bytes() for p in stopped.iterdir() if p.is_file()} == before  # refused before any work


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
