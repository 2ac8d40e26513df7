"""minhub next to llama.cpp on the same weights, on this CPU (optional: not part of the tests or CI).

llama.cpp is what a user would pick for CPU inference instead, so its speed is the bar. This script:
1. downloads the llama-cpp-python source distribution with pip (it vendors llama.cpp and its GGUF converter) and
   builds llama.cpp's `llama-bench` with -DGGML_NATIVE=ON: 5-10 minutes on 2 cores, once (kept in --work);
2. writes a random checkpoint of --shape (GPT-2 124M, or a bench_families.py shape such as SmolLM2-135M's; or takes
   --model DIR, a GPT-2) and converts it to GGUF with llama.cpp's own converter (needs `pip install gguf
   sentencepiece`, and transformers from the test extra): GPT-2 to f32 and q8_0; the other shapes to f32, bf16 and
   q8_0, each against minhub at the same precision (fp32, bf16, int8). The converter wants a tokenizer: GPT-2's, cut or
   padded to the shape's vocabulary (it checks which pre-tokenizer the vocabulary is; told it is GPT-2's, as it is);
3. runs `llama-bench -t THREADS -p 32 -n 64 -pg 32,64 -r 1` and minhub on the same checkpoint in turn, for --rounds
   paired rounds (this machine's bandwidth moves within minutes), and prints the medians: decode alone (tokens/s
   after the prompt) and a 32-token prompt plus 64 new tokens counted as 64 / whole time.

Run from the repo root:  python bench/bench_llama_cpp.py [--shape smollm2-135m]
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
from bench_families import SHAPES, write_checkpoint  # noqa: E402
from bench_gpt2 import (decode_rate, eager_step, machine, ours, print_table,  # noqa: E402
                        write_random_gpt2)

from minhub import from_pretrained, gpt2_from_pretrained, hardware, matmul  # noqa: E402
from minhub.speed import compile_decode, quantize_int8  # noqa: E402

TOKENIZER = Path(__file__).parents[1] / "tests" / "fixtures" / "gpt2-tokenizer"


def llama_cpp_source(work: Path, version: str) -> Path:
    """The vendored llama.cpp of llama-cpp-python's sdist, downloaded and unpacked into `work` once."""
    unpacked = work / f"llama_cpp_python-{version}"
    if not unpacked.is_dir():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
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


# convert_hf_to_gguf.py, run with the pre-tokenizer check answered: a cut GPT-2 vocabulary is GPT-2's pre-tokenizer
# (the converter recognises a vocabulary by hashing how it splits a test text, and a cut one splits differently)
CONVERT_AS_GPT2 = """
import runpy, sys
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def to_gguf(source: Path, model_dir: Path, outtype: str, out: Path, gpt2_vocab: bool = False) -> Path:
    """The checkpoint converted by llama.cpp's convert_hf_to_gguf.py (its vendored gguf-py first on the path);
    gpt2_vocab: the checkpoint carries a cut GPT-2 tokenizer (gpt2_tokenizer_for)."""
    if not out.is_file():
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source / "gguf-py"), str(source)])}
        prefix = [sys.executable, "-c", CONVERT_AS_GPT2] if gpt2_vocab else [sys.executable]
        subprocess.run([*prefix, str(source / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
                        "--outfile", str(out)], check=True, env=env)
    return out


def gpt2_tokenizer_for(model_dir: Path, vocab_size: int) -> None:
    """Write GPT-2's tokenizer into model_dir with its ids cut to vocab_size (the merges that stay inside it kept;
    the converter pads a larger vocabulary itself): llama.cpp's speed does not depend on which tokens exist."""
    tokenizer = json.loads((TOKENIZER / "tokenizer.json").read_text())
    vocab = {token: i for token, i in tokenizer["model"]["vocab"].items() if i < vocab_size}
    merges = [m if isinstance(m, list) else m.split(" ") for m in tokenizer["model"]["merges"]]
    tokenizer["model"]["vocab"] = vocab
    tokenizer["model"]["merges"] = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] < vocab_size]
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


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


def minhub_models(model_dir: Path, shape: str) -> dict[str, torch.nn.Module]:
    """minhub's paths on the checkpoint, warmed up (and compiled). GPT-2: the default fp32 and int8 (batch 1: the
    precompiled decode step), fp32 through the eager step and through compile_decode. Other shapes: the default
    fp32, bf16 and int8, the precisions of llama.cpp's f32, bf16 and q8_0."""
    if shape != "gpt2-124m":
        models = {"minhub fp32 (default)": from_pretrained(model_dir),
                  "minhub bf16 (default)": from_pretrained(model_dir, dtype=torch.bfloat16),
                  "minhub int8 (quantize_int8)": quantize_int8(from_pretrained(model_dir))}
    else:
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


PROMPT = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))  # inside every shape's vocab


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
    parser.add_argument("--shape", choices=["gpt2-124m", *sorted(SHAPES)], default="gpt2-124m")
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
    model_dir = Path(args.model) if args.model else Path(tmp.name) / args.shape
    if args.shape != "gpt2-124m":
        write_checkpoint(args.shape, model_dir)
        gpt2_tokenizer_for(model_dir, SHAPES[args.shape][2]["vocab_size"])
        gguf = {f"llama.cpp {t}": to_gguf(source, model_dir, t, Path(tmp.name) / f"{t}.gguf", gpt2_vocab=True)
                for t in ("f32", "bf16", "q8_0")}
    else:
        if not args.model:
            write_random_gpt2(model_dir)
            without_mask_buffers(model_dir / "model.safetensors")
            for name in ("vocab.json", "merges.txt", "tokenizer.json"):  # the converter reads GPT-2's tokenizer
                shutil.copy(TOKENIZER / name, model_dir / name)
        gguf = {f"llama.cpp {t}": to_gguf(source, model_dir, t, Path(tmp.name) / f"{t}.gguf") for t in ("f32", "q8_0")}

    print(f"machine: {machine()}")
    print(f"matmul plan: {matmul.plan().describe()}")
    print(f"llama.cpp: {source} (llama-cpp-python {args.llama_cpp_python}), built with -DGGML_NATIVE=ON")
    models = minhub_models(model_dir, args.shape)
    rounds: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):  # paired: each round runs llama-bench once, then each minhub path once
        for name, r in {**llama_bench(binary, gguf, args.threads, 1), **minhub_round(models)}.items():
            for kind, value in r.items():
                rounds.setdefault(name, {}).setdefault(kind, []).append(value)
    rates = {name: {kind: statistics.median(v) for kind, v in r.items()} for name, r in rounds.items()}
    print()
    print_table([f"{args.shape}, random weights, batch 1, greedy", "decode alone (tok/s)",
                 "32-token prompt + 64 new, 64 / whole time (tok/s)"],
                [[name, f"{r.get('decode', float('nan')):.1f}", f"{r.get('prompt + decode', float('nan')):.1f}"]
                 for name, r in rates.items()])


if __name__ == "__main__":
    main()
