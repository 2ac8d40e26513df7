"""minhub/gpt2.py works copied alone into another project; the CLI streams what the API generates."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import hf_gpt2, hub_checkpoint, save_checkpoint
from plans import fake_cpu

import minhub
from minhub import generate, gpt2_from_pretrained, tokenizer_from_pretrained

REPO_ROOT = Path(__file__).parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


def test_gpt2_py_copied_alone_loads_and_samples(tmp_path):
    ckpt = save_checkpoint(hf_gpt2(), tmp_path / "ckpt")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(Path(minhub.__file__).parent / "gpt2.py", project / "gpt2.py")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(project)!r})
        import gpt2
        model = gpt2.gpt2_from_pretrained({str(ckpt)!r})
        out = gpt2.generate(model, torch.tensor([[1, 2, 3]]), 10, top_k=5, generator=torch.Generator().manual_seed(0))
        assert not any(name == "minhub" or name.startswith("minhub.") for name in sys.modules), "minhub was imported"
        print(out[0].tolist())
    """)
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=project, capture_output=True, text=True,
                            env=_env())
    assert result.returncode == 0, result.stderr
    expected = generate(gpt2_from_pretrained(ckpt), torch.tensor([[1, 2, 3]]), 10, top_k=5,
                        generator=torch.Generator().manual_seed(0))
    assert result.stdout.strip() == str(expected[0].tolist())


@pytest.fixture(scope="module")
def gpt2_shaped_repo():
    """A tiny model with GPT-2's vocabulary and the real tokenizer, in the cache as tests/tiny-gpt2."""
    hub_checkpoint("tests/tiny-gpt2", hf_gpt2(vocab_size=50257, n_embd=16, n_head=2, bos_token_id=50256,
                                              eos_token_id=50256, std=0.5), tokenizer=True)
    return "tests/tiny-gpt2"


@pytest.mark.parametrize("command, options", [(["-m", "minhub"], []), (None, []), (["-m", "minhub"], ["--compile"])])
def test_cli_streams_the_api_result(gpt2_shaped_repo, command, options):
    prompt = "The meaning of life is"
    if command is None:
        exe = shutil.which("minhub")
        if exe is None:
            pytest.skip("the minhub console script is not installed (pip install -e .)")
        argv = [exe]
    else:
        argv = [sys.executable, *command]
    result = subprocess.run(
        argv + ["generate", gpt2_shaped_repo, prompt, "--max-new-tokens", "12", "--top-k", "40", "--seed", "0",
                "--ignore-eos", *options],
        capture_output=True, text=True, env=_env(), cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    model = gpt2_from_pretrained(gpt2_shaped_repo)
    tokenizer = tokenizer_from_pretrained(gpt2_shaped_repo)
    idx = torch.tensor([tokenizer.encode(prompt).ids])
    out = generate(model, idx, 12, top_k=40, generator=torch.Generator().manual_seed(0))
    assert result.stdout == prompt + tokenizer.decode(out[0, idx.size(1):].tolist()) + "\n"


def test_cli_reports_errors_without_a_traceback(gpt2_shaped_repo):
    """A model that is not there, and a bad flag given with a model that is: exit 2, one line naming the culprit."""
    result = subprocess.run([sys.executable, "-m", "minhub", "generate", "nobody/missing", "hi"],
                            capture_output=True, text=True, env=_env(), cwd=REPO_ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("minhub: 'nobody/missing' is not in the Hugging Face cache")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    result = subprocess.run([sys.executable, "-m", "minhub", "generate", gpt2_shaped_repo, "hi", "--temperature", "-1"],
                            capture_output=True, text=True, env=_env(), cwd=REPO_ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("minhub: temperature must be a finite number >= 0 (0 means greedy), got -1.0")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_cli_int8_streams_what_the_quantized_model_generates(gpt2_shaped_repo):
    from minhub.speed import quantize_int8

    prompt = "The meaning of life is"
    result = subprocess.run([sys.executable, "-m", "minhub", "generate", gpt2_shaped_repo, prompt, "--int8",
                             "--max-new-tokens", "8", "--temperature", "0", "--ignore-eos"],
                            capture_output=True, text=True, env=_env(), cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    model = quantize_int8(gpt2_from_pretrained(gpt2_shaped_repo))
    tokenizer = tokenizer_from_pretrained(gpt2_shaped_repo)
    idx = torch.tensor([tokenizer.encode(prompt).ids])
    out = generate(model, idx, 8, temperature=0)
    assert result.stdout == prompt + tokenizer.decode(out[0, idx.size(1):].tolist()) + "\n"


@pytest.mark.parametrize("options, message", [(["--compile", "--dtype", "bfloat16"], "--compile does not combine"),
                                              (["--int8", "--dtype", "float16"], "--int8 is CPU-only")])
def test_cli_refuses_combinations_that_do_not_work(gpt2_shaped_repo, options, message):
    result = subprocess.run([sys.executable, "-m", "minhub", "generate", gpt2_shaped_repo, "hi", *options],
                            capture_output=True, text=True, env=_env(), cwd=REPO_ROOT)
    assert result.returncode == 2 and message in result.stderr


def test_import_minhub_stays_light():
    code = ("import sys, minhub; heavy = [m for m in ('transformers', 'huggingface_hub', 'safetensors', 'tokenizers',"
            " 'x_transformers', 'tiktoken') if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert result.stdout.strip() == "[]", result.stderr


def test_tutorial_example_samples_what_generate_samples(gpt2_shaped_repo):
    prompt = "Once upon a time"
    result = subprocess.run(
        [sys.executable, "examples/generate_gpt2.py", prompt, "--model", gpt2_shaped_repo, "--max-new-tokens", "10",
         "--top-k", "20", "--seed", "3"],
        capture_output=True, text=True, env=_env(), cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    model = gpt2_from_pretrained(gpt2_shaped_repo)
    tokenizer = tokenizer_from_pretrained(gpt2_shaped_repo)
    idx = torch.tensor([tokenizer.encode(prompt).ids])
    out = generate(model, idx, 10, top_k=20, eos_token_id=50256, generator=torch.Generator().manual_seed(3))
    expected = tokenizer.decode(out[0].tolist(), skip_special_tokens=False).split("<|endoftext|>")[0]
    assert result.stdout == expected + "\n"


def test_gpt4_py_copied_alone_builds_saves_loads_and_samples(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(Path(minhub.__file__).parent / "gpt4.py", project / "gpt4.py")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(project)!r})
        import gpt4
        torch.manual_seed(0)
        model = gpt4.GPT4(num_tokens=50, max_seq_len=32, dim=32, depth=2, dim_head=16, heads=4, alibi_num_heads=2)
        model.save_pretrained({str(tmp_path / "run")!r})
        loaded = gpt4.GPT4.from_pretrained({str(tmp_path / "run")!r})
        prompt = torch.tensor([[1, 2, 3]])
        assert torch.equal(loaded.generate(prompt, 40, temperature=0), model.generate(prompt, 40, temperature=0))
        assert not any(name == "minhub" or name.startswith("minhub.") for name in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=project, capture_output=True, text=True,
                            env=_env())
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_gpt4_example_samples_what_the_api_samples():
    """The example without --model: the model it builds with seed 0 and the tokens GPT4.generate samples from it."""
    result = subprocess.run([sys.executable, "examples/gpt4_generate.py", "--new-tokens", "12"],
                            capture_output=True, text=True, env=_env(), cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    torch.manual_seed(0)
    model = minhub.GPT4(num_tokens=256, max_seq_len=128, dim=256, depth=4, dim_head=32, heads=8,
                        alibi_num_heads=4).eval()
    ids = list("ROMEO:".encode("utf-8"))
    new = model.generate(torch.tensor([ids]), 12, temperature=0.8, filter_logits_fn="top_k", filter_kwargs={"k": 10},
                         generator=torch.Generator().manual_seed(0))
    count = sum(p.numel() for p in model.parameters())
    assert result.stdout.splitlines()[-2:] == [f"{count:,} parameters; prompt {ids} ->", str(new[0].tolist())]


# --- what the machine cannot do: one line, exit 2, nothing printed before -----------------------------------------


def test_cli_bfloat16_without_onednn_bf16_takes_the_default_path(gpt2_shaped_repo, capsys, monkeypatch):
    from minhub import matmul
    from minhub.cli import main

    fake_cpu(monkeypatch, onednn_bf16=False)  # as on AVX2-only CPUs: no packing, the loader's matmul plan instead
    prompt = "The meaning of life is"
    assert main(["generate", gpt2_shaped_repo, prompt, "--dtype", "bfloat16", "--max-new-tokens", "8",
                 "--temperature", "0", "--ignore-eos"]) == 0
    model = gpt2_from_pretrained(gpt2_shaped_repo, dtype=torch.bfloat16)
    assert isinstance(model.lm_head, matmul.CPULinear)
    tokenizer = tokenizer_from_pretrained(gpt2_shaped_repo)
    idx = torch.tensor([tokenizer.encode(prompt).ids])
    out = generate(model, idx, 8, temperature=0)
    assert capsys.readouterr().out == prompt + tokenizer.decode(out[0, idx.size(1):].tolist()) + "\n"


def test_cli_bfloat16_packs_the_weights(gpt2_shaped_repo, capsys):
    from minhub import hardware
    from minhub.cli import main
    from minhub import speed

    if not hardware.cpu_info().onednn_bf16:
        pytest.skip(f"needs oneDNN bf16 kernels (AVX-512 BW/VL/DQ or AVX-NE-CONVERT); {hardware.cpu_info().describe()}")
    prompt = "The meaning of life is"
    assert main(["generate", gpt2_shaped_repo, prompt, "--dtype", "bfloat16", "--max-new-tokens", "8",
                 "--temperature", "0", "--ignore-eos"]) == 0
    model = speed.optimize(gpt2_from_pretrained(gpt2_shaped_repo, dtype=torch.bfloat16), weights="bf16-packed")
    tokenizer = tokenizer_from_pretrained(gpt2_shaped_repo)
    idx = torch.tensor([tokenizer.encode(prompt).ids])
    out = generate(model, idx, 8, temperature=0)
    assert capsys.readouterr().out == prompt + tokenizer.decode(out[0, idx.size(1):].tolist()) + "\n"


def test_cli_compile_without_a_compiler_is_one_line_before_any_output(gpt2_shaped_repo, capsys, monkeypatch):
    from minhub.cli import main

    fake_cpu(monkeypatch, cxx=None)
    assert main(["generate", gpt2_shaped_repo, "hello", "--compile"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("minhub: --compile needs a C++ compiler")


@pytest.mark.parametrize("device", ["cuda:99", "mps", "tpu"])
def test_cli_a_missing_device_is_one_line_naming_what_exists(gpt2_shaped_repo, device):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    result = subprocess.run([sys.executable, "-m", "minhub", "generate", gpt2_shaped_repo, "hello", "--device", device],
                            capture_output=True, text=True, env=_env(), cwd=REPO_ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("minhub: ") and "Traceback" not in result.stderr
    assert ("Available here: cpu" in result.stderr) or "use cpu, cuda, cuda:N or mps" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("option, message", [
    (["--top-k", "-1"], "top_k must be a positive integer, or None for no top-k filtering; got -1"),
    (["--top-p", "1.5"], "top_p must be in (0, 1], or None for no nucleus filtering; got 1.5"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0 (0 means greedy), got nan"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 0, got -3"),
], ids=["top-k", "top-p", "temperature", "max-new-tokens"])
def test_cli_bad_sampling_values_fail_before_the_prompt_is_printed(gpt2_shaped_repo, option, message, capsys):
    """With a model that loads, each bad value is refused by name, in one line, before anything is printed."""
    from minhub.cli import main

    assert main(["generate", gpt2_shaped_repo, "hello", *option]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"minhub: {message}\n"
