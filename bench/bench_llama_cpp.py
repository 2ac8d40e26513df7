"""minhub next to llama.cpp on the same GPT-2 124M weights, on this CPU (optional: not part of the tests or CI).

llama.cpp is what a user would pick for CPU inference instead, so its speed is the bar. This script:
1. downloads the llama-cpp-python source distribution with pip (it vendors llama.cpp and its GGUF converter) and
   builds llama.cpp's `llama-bench` with -DGGML_NATIVE=ON: 5-10 minutes on 2 cores, once (kept in --work);
2. writes a random checkpoint with GPT-2 124M's shapes (or takes --model DIR) and converts it to GGUF, f32 and q8_0,
   with llama.cpp's own converter (needs `pip install gguf`, and transformers from the test extra);
3. runs `llama-bench -t THREADS -p 32 -n 64 -pg 32,64 -r 1` and minhub on the same checkpoint in turn, for --rounds
   paired rounds (this machine's bandwidth moves within minutes), and prints the medians: decode alone (tokens/s
   after the prompt) and a 32-token prompt plus 64 new tokens counted as 64 / whole time.

Run from the repo root:  python bench/bench_llama_cpp.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpt2 import (decode_rate, eager_step, machine, ours, print_table,  # noqa: E402
                        write_random_gpt2)

from minhub import gpt2_from_pretrained, hardware, matmul  # noqa: E402
from minhub.speed import compile_decode, quantize_int8  # noqa: E402

TOKENIZER = Path(__file__).parents[1] / "tests" / "fixtures" / "gpt2-tokenizer"


def llama_cpp_source(work: Path, version: str) -> Path:
    """The vendored llama.cpp of llama-cpp-python's sdist, downloaded and unpacked into `work` once."""
    unpacked = work / f"llama_cpp_python-{version}"
    if not unpacked.is_dir():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(work)], check=True)
        with tarfile.open(work / f"llama_cpp_python-{version}.tar.gz") as archive:
            archive.extractall(work, filter="data")
    return unpacked / "vendor" / "llama.cpp"


def build_llama_bench(source: Path, work: Path, jobs: int) -> Path:
    """llama.cpp's llama-bench, built for this CPU (-DGGML_NATIVE=ON) into work/build once."""
    build = work / "build"
    binary = build / "bin" / "llama-bench"
    if not binary.is_file():
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(jobs)], check=True)
    return binary


def to_gguf(source: Path, model_dir: Path, outtype: str, out: Path) -> Path:
    """The checkpoint converted by llama.cpp's convert_hf_to_gguf.py (its vendored gguf-py first on the path)."""
    if not out.is_file():
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source / "gguf-py"), str(source)])}
        subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
                        "--outfile", str(out)], check=True, env=env)
    return out


def without_mask_buffers(path: Path) -> None:
    """Drop the causal-mask buffers (`h.N.attn.bias`) some hub checkpoints store: the GGUF converter refuses them."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}, path,
              metadata={"format": "pt"})


def llama_bench(binary: Path, models: dict[str, Path], threads: int, rounds: int) -> dict[str, dict[str, float]]:
    """{label: {"decode": tg64 tokens/s, "prompt + decode": 64 / time of pp32 + tg64}} from llama-bench's JSON."""
    command = [str(binary), "-t", str(threads), "-p", "32", "-n", "64", "-pg", "32,64", "-r", str(rounds), "-o",
               "json"]
    for path in models.values():
        command += ["-m", str(path)]
    runs = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    results: dict[str, dict[str, float]] = {}
    for label, path in models.items():
        for run in runs:
            if Path(run["model_filename"]).name != path.name:
                continue
            if run["n_prompt"] == 0 and run["n_gen"] == 64:
                results.setdefault(label, {})["decode"] = run["avg_ts"]
            elif run["n_prompt"] == 32 and run["n_gen"] == 64:  # avg_ts counts all 96 tokens
                results.setdefault(label, {})["prompt + decode"] = run["avg_ts"] * 64 / 96
    return results


def minhub_models(model_dir: Path) -> dict[str, torch.nn.Module]:
    """minhub's default fp32 and int8 paths (batch 1: the precompiled decode step), fp32 through the eager step, and
    fp32 through compile_decode, on the checkpoint, warmed up (and compiled)."""
    models = {"minhub fp32 (default)": gpt2_from_pretrained(model_dir),
              "minhub fp32, eager step": eager_step(gpt2_from_pretrained(model_dir)),
              "minhub int8 (quantize_int8)": quantize_int8(gpt2_from_pretrained(model_dir))}
    if hardware.cpu_info().can_compile:
        models["minhub fp32 compile_decode"] = compile_decode(gpt2_from_pretrained(model_dir))
    else:
        print(f"minhub fp32 compile_decode: unavailable ({hardware.cpu_info().describe()})")
    with torch.inference_mode():
        for model in models.values():
            ours(model, PROMPT, 4)
    return models


PROMPT = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(0))


def minhub_round(models: dict[str, torch.nn.Module]) -> dict[str, dict[str, float]]:
    """One round of each minhub path: decode alone, and the 32-token prompt plus 64 new tokens (64 / whole time)."""
    results = {}
    with torch.inference_mode():
        for name, model in models.items():
            decode = decode_rate(lambda n, model=model: ours(model, PROMPT, n), 64)[0]
            start = time.perf_counter()
            ours(model, PROMPT, 64)
            results[name] = {"decode": decode, "prompt + decode": 64 / (time.perf_counter() - start)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a GPT-2 checkpoint directory (default: random 124M)")
    parser.add_argument("--work", default=str(matmul.cache_dir() / "llama.cpp"), help="where llama.cpp is built")
    parser.add_argument("--llama-cpp-python", default="0.3.36", help="the sdist version that vendors llama.cpp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)

    source = llama_cpp_source(work, args.llama_cpp_python)
    binary = build_llama_bench(source, work, os.cpu_count() or 2)
    tmp = tempfile.TemporaryDirectory()
    if args.model:
        model_dir = Path(args.model)
    else:
        model_dir = write_random_gpt2(Path(tmp.name) / "gpt2")
        without_mask_buffers(model_dir / "model.safetensors")
        for name in ("vocab.json", "merges.txt", "tokenizer.json"):  # the converter reads GPT-2's tokenizer
            shutil.copy(TOKENIZER / name, model_dir / name)
    gguf = {"llama.cpp f32": to_gguf(source, model_dir, "f32", Path(tmp.name) / "gpt2-f32.gguf"),
            "llama.cpp q8_0": to_gguf(source, model_dir, "q8_0", Path(tmp.name) / "gpt2-q8_0.gguf")}

    print(f"machine: {machine()}")
    print(f"matmul plan: {matmul.plan().describe()}")
    print(f"llama.cpp: {source} (llama-cpp-python {args.llama_cpp_python}), built with -DGGML_NATIVE=ON")
    models = minhub_models(model_dir)
    rounds: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):  # paired: each round runs llama-bench once, then each minhub path once
        for name, r in {**llama_bench(binary, gguf, args.threads, 1), **minhub_round(models)}.items():
            for kind, value in r.items():
                rounds.setdefault(name, {}).setdefault(kind, []).append(value)
    rates = {name: {kind: statistics.median(v) for kind, v in r.items()} for name, r in rounds.items()}
    print()
    print_table(["GPT-2 124M, batch 1, greedy", "decode alone (tok/s)",
                 "32-token prompt + 64 new, 64 / whole time (tok/s)"],
                [[name, f"{r.get('decode', float('nan')):.1f}", f"{r.get('prompt + decode', float('nan')):.1f}"]
                 for name, r in rates.items()])


if __name__ == "__main__":
    main()
