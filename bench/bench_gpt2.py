"""GPT-2 124M inference, minhub next to transformers, in one process on the same weights.

Prints the machine, absolute figures, ratios (minhub / transformers) and the memory-bandwidth roofline, then a
markdown table for docs/speed.md. Run from the repo root:  python bench/bench_gpt2.py
(--model DIR_OR_REPO uses real weights; by default a random checkpoint with GPT-2 124M's exact shapes is written to a
temporary directory: speed does not depend on the values.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import weakref
import tempfile
import time
from unittest import mock
from pathlib import Path

import torch

from minhub import generate, gpt2_from_pretrained, hardware, matmul, speed


def write_random_gpt2(directory: Path) -> Path:
    """A random checkpoint in the OpenAI gpt2 repo's layout: (in, out) Conv1D weights, mask buffers, no lm_head."""
    from safetensors.torch import save_file

    d, v, p, n_layer = 768, 50257, 1024, 12
    state = {"wte.weight": torch.randn(v, d) * 0.02, "wpe.weight": torch.randn(p, d) * 0.01,
             "ln_f.weight": torch.ones(d), "ln_f.bias": torch.zeros(d)}
    for i in range(n_layer):
        state.update({
            f"h.{i}.ln_1.weight": torch.ones(d), f"h.{i}.ln_1.bias": torch.zeros(d),
            f"h.{i}.attn.bias": torch.tril(torch.ones(p, p)).view(1, 1, p, p),
            f"h.{i}.attn.c_attn.weight": torch.randn(d, 3 * d) * 0.02, f"h.{i}.attn.c_attn.bias": torch.zeros(3 * d),
            f"h.{i}.attn.c_proj.weight": torch.randn(d, d) * 0.02, f"h.{i}.attn.c_proj.bias": torch.zeros(d),
            f"h.{i}.ln_2.weight": torch.ones(d), f"h.{i}.ln_2.bias": torch.zeros(d),
            f"h.{i}.mlp.c_fc.weight": torch.randn(d, 4 * d) * 0.02, f"h.{i}.mlp.c_fc.bias": torch.zeros(4 * d),
            f"h.{i}.mlp.c_proj.weight": torch.randn(4 * d, d) * 0.02, f"h.{i}.mlp.c_proj.bias": torch.zeros(d),
        })
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": v, "n_positions": p,
              "n_ctx": p, "n_embd": d, "n_layer": n_layer, "n_head": 12, "activation_function": "gelu_new",
              "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def machine() -> str:
    """The CPU (model, instruction sets, what the fast paths find) and the software."""
    return (f"{hardware.cpu_info().describe()}; {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def bandwidth_gbs(rounds: int = 7) -> float:
    """Read bandwidth: the best time to sum a 1 GiB float32 tensor (read once, nothing written back)."""
    x = torch.ones(2**28)
    x.sum()
    best = min(_timed(x.sum) for _ in range(rounds))
    del x
    return 2**30 / best / 1e9


def matrix_read_gbs(model, rounds: int = 7, passes: int = 1) -> float:
    """Read bandwidth as a decode step meets it: summing every weight matrix in turn, in the model's order (the same
    bytes as a step, with the per-matrix start-up a matmul also pays); the best of `rounds` timings of `passes` passes
    in a row."""
    matrices = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    best = min(_timed(lambda: [w.sum() for _ in range(passes) for w in matrices]) for _ in range(rounds))
    return passes * sum(w.numel() * w.element_size() for w in matrices) / best / 1e9


EAGER: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def eager_step(model):
    """`model` decoding through its eager forward, not the precompiled step (`ours` sets MINHUB_DECODE=eager)."""
    EAGER.add(model)
    return model


def blas_only(model_dir: Path):
    """The BLAS-only model: nn.Linear with PyTorch's kernel for every product (MINHUB_MATMUL=blas) and the eager
    decode step."""
    previous = os.environ.get("MINHUB_MATMUL")
    os.environ["MINHUB_MATMUL"] = "blas"
    try:
        return eager_step(gpt2_from_pretrained(model_dir))
    finally:
        os.environ.pop("MINHUB_MATMUL") if previous is None else os.environ.update(MINHUB_MATMUL=previous)


def stepwise_logits(model, idx: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits (B, T, V) through the KV-cached decode step, one token at a time: the path generate
    takes, compiled or not."""
    model.setup_cache(idx.size(0), model.config.n_positions + 1)  # the engine's cache: no recompile
    step = speed.decode_step(model, idx.size(0), masked=False)
    return torch.cat([model(idx[:, :1], 0)] + [step(idx[:, t:t + 1], t) for t in range(1, idx.size(1))], dim=1)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_rate(run, new_tokens: int) -> tuple[float, float]:
    """(decode tokens/s, time to first token in s) for a `run(max_new_tokens)` callable: the time of generating
    `new_tokens` minus the time of generating 1, over new_tokens - 1 steps."""
    first = _timed(lambda: run(1))
    total = _timed(lambda: run(new_tokens))
    return (new_tokens - 1) / (total - first), first


def ours(model, idx, max_new):
    if model not in EAGER:
        return generate(model, idx, max_new, temperature=0)
    with mock.patch.dict(os.environ, {"MINHUB_DECODE": "eager"}):
        return generate(model, idx, max_new, temperature=0)


def theirs(model, idx, max_new):
    return model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=max_new, min_new_tokens=max_new,
                          do_sample=False, pad_token_id=50256)


def paired(fns: dict, rounds: int) -> dict:
    """Run each callable once per round, in turn, for `rounds` rounds; return each one's median."""
    results = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            results[name].append(fn())
    return {name: statistics.median(values) for name, values in results.items()}


def load_benchmark(model_dir: Path, rounds: int) -> dict:
    """Whole-process time (imports included) and peak RSS of loading the checkpoint, in fresh processes."""
    scripts = {
        "ours": "from minhub import gpt2_from_pretrained as load; m = load(sys.argv[1])",
        "theirs": "from transformers import GPT2LMHeadModel; m = GPT2LMHeadModel.from_pretrained(sys.argv[1])",
    }
    # peak RSS from /proc (VmHWM, in kB): ru_maxrss survives exec, so a child of this big process would report
    # its parent's peak
    probe = ("import re, sys, torch; "
             "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]);"
             " base = hwm(); {load}; m(torch.tensor([[1, 2, 3]])); print(base, hwm())")
    out = {}
    for name, load in scripts.items():
        times, rss = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            result = subprocess.run([sys.executable, "-c", probe.format(load=load), str(model_dir)],
                                    capture_output=True, text=True, check=True)
            times.append(time.perf_counter() - t)
            base_kb, peak_kb = map(int, result.stdout.split()[-2:])
            rss.append((base_kb * 1024, peak_kb * 1024))
        out[name] = {"seconds": statistics.median(times), "rss_after_torch_import": rss[0][0],
                     "peak_rss": statistics.median(r[1] for r in rss)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory or repo id (default: random 124M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--long", type=int, default=1200, help="tokens for the long-generation check (0: skip)")
    parser.add_argument("--window-shift", type=int, default=256, help="generate()'s window_shift for that check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import GPT2LMHeadModel

    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(args.model) if args.model else write_random_gpt2(Path(tmp.name) / "gpt2")
    model = gpt2_from_pretrained(model_dir)
    ref = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bytes_per_token = weight_bytes - model.transformer.wpe.weight.numel() * 4  # one wpe row per token is negligible

    print(f"machine: {machine()}")
    print(f"matmul plan (minhub.matmul, measured once per machine): {matmul.plan().describe()}")
    bw = bandwidth_gbs()
    roofline = bw * 1e9 / bytes_per_token
    print(f"read bandwidth {bw:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB; fp32 batch-1 roofline "
          f"{roofline:.1f} tok/s")
    with torch.inference_mode():
        matrix_bw = matrix_read_gbs(model)
    matrix_roofline = matrix_bw * 1e9 / bytes_per_token
    print(f"reading the weight matrices one after another: {matrix_bw:.1f} GB/s ({matrix_bw / bw:.0%} of the 1 GiB "
          f"read), a batch-1 ceiling of {matrix_roofline:.1f} tok/s")

    from minhub.speed import compile_decode, prepack, quantize_int8

    cpu = hardware.cpu_info()
    unavailable = {}  # variant -> why this machine cannot run it
    if not cpu.onednn_bf16:
        unavailable["minhub bf16 packed"] = "no oneDNN bf16 kernels (needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)"
    if not cpu.can_compile:
        reason = "no C++ compiler for inductor" if cpu.cxx is None else "no Python.h for inductor"
        unavailable["minhub fp32 compile_decode"] = unavailable["minhub int8 compile_decode"] = reason
    for name, reason in unavailable.items():
        print(f"{name}: unavailable on this machine ({reason})")

    rows = []
    g = torch.Generator().manual_seed(0)
    blas = blas_only(model_dir)
    reduced = {"bf16": gpt2_from_pretrained(model_dir, dtype=torch.bfloat16),  # unpacked: what runs everywhere
               "int8": quantize_int8(gpt2_from_pretrained(model_dir))}
    if "minhub bf16 packed" not in unavailable:
        reduced["bf16 packed"] = prepack(gpt2_from_pretrained(model_dir))
    compiled = int8_compiled = None
    if "minhub fp32 compile_decode" not in unavailable:
        compiled = compile_decode(gpt2_from_pretrained(model_dir))
        int8_compiled = reduced["int8 compiled, decode steps"] = compile_decode(
            quantize_int8(gpt2_from_pretrained(model_dir)))
    eager = eager_step(gpt2_from_pretrained(model_dir))
    with torch.inference_mode():
        # the default path's precompiled decode step (minhub.precompiled): built at the first batch-1 generate on a
        # machine (then loaded from the disk cache in milliseconds)
        for name, m in (("fp32", model), ("bf16", reduced["bf16"]), ("int8", reduced["int8"])):
            seconds = _timed(lambda: ours(m, torch.zeros(1, 4, dtype=torch.long), 2))
            print(f"first batch-1 generate, {name}: {seconds:.1f} s (includes building the decode step's package "
                  "if this machine had none)", flush=True)
        # identical outputs first: a fast path that changes the tokens is not a speed-up
        prompt = torch.randint(0, 50257, (1, 32), generator=g)
        assert torch.equal(ours(model, prompt, 32), theirs(ref, prompt, 32)), "greedy tokens differ"
        assert torch.equal(ours(blas, prompt, 32), theirs(ref, prompt, 32)), "greedy tokens differ (BLAS only)"
        assert torch.equal(ours(eager, prompt, 32), theirs(ref, prompt, 32)), "greedy tokens differ (eager step)"

        for batch in (1, 8):
            idx = torch.randint(0, 50257, (batch, 32), generator=g)
            assert torch.equal(ours(model, idx, 16), theirs(ref, idx, 16)), f"greedy tokens differ at batch {batch}"
            variants = {"minhub fp32": (ours, model), "minhub fp32 eager step": (ours, eager),
                        "minhub fp32 BLAS only": (ours, blas),
                        "minhub fp32 compile_decode": (ours, compiled),
                        "minhub bf16": (ours, reduced["bf16"]),
                        "minhub bf16 packed": (ours, reduced.get("bf16 packed")),
                        "minhub int8": (ours, reduced["int8"]),
                        "minhub int8 compile_decode": (ours, int8_compiled), "transformers fp32": (theirs, ref)}
            if batch > 1 and not cpu.onednn_bf16 and matmul.plan().kernel(torch.bfloat16, False) == "blas":
                # batched bf16 matmuls go to ATen's fallback kernel there, which takes minutes
                unavailable["minhub bf16"] = "no oneDNN bf16 kernels nor minhub::linear: batched bf16 takes ATen's " \
                                             "slow fallback"
            variants = {name: v for name, v in variants.items() if name not in unavailable}
            if compiled is not None:
                compile_seconds = _timed(lambda: ours(compiled, idx, 2))  # the first decode step compiles
                compile_int8_seconds = _timed(lambda: ours(int8_compiled, idx, 2))
                print(f"compile_decode, batch {batch}: first step compiled in {compile_seconds:.0f} s (fp32), "
                      f"{compile_int8_seconds:.0f} s (int8)", flush=True)
                assert torch.equal(ours(compiled, idx, 16), ours(model, idx, 16)), "compiled fp32 tokens differ"
            for fn, m in variants.values():
                fn(m, idx, 4)  # warm up

            def rate(fn, m):
                return decode_rate(lambda n: fn(m, idx, n), args.new_tokens)[0] * batch

            fns = {name: (lambda fn=fn, m=m: rate(fn, m)) for name, (fn, m) in variants.items()}
            if batch == 1:
                # the limit itself, in the same rounds: the bandwidth of this shared machine moves by 20-40% within
                # minutes, so a limit measured once at the start would misstate every share. It is timed like the
                # rates it divides: one timing of the weights read as many times as the decode steps timed (the best
                # of three single passes, 20 ms each, catches the machine's fast moments: reported beside it)
                fns["matrix-read limit"] = lambda: matrix_read_gbs(
                    model, rounds=1, passes=args.new_tokens - 1) * 1e9 / bytes_per_token
                fns["matrix-read, best single pass"] = lambda: matrix_read_gbs(model, rounds=3) * 1e9 / bytes_per_token
            r = paired(fns, args.rounds)
            base = r["transformers fp32"]
            if batch == 1:
                matrix_roofline, best_pass = r.pop("matrix-read limit"), r.pop("matrix-read, best single pass")
                print(f"matrix-read limit measured in the same rounds: {matrix_roofline:.1f} tok/s "
                      f"({matrix_roofline * bytes_per_token / 1e9:.1f} GB/s; {args.new_tokens - 1} passes timed "
                      f"together); the best of three single passes: {best_pass:.1f} tok/s, against which the fp32 "
                      f"default makes {r['minhub fp32'] / best_pass:.0%}")
            print(f"decode batch {batch} (tok/s): " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
            for name in ("minhub fp32", "minhub fp32 eager step", "minhub fp32 BLAS only", "minhub fp32 compile_decode",
                         "minhub bf16", "minhub bf16 packed", "minhub int8", "minhub int8 compile_decode"):
                label = f"decode, batch {batch}, {name} (tok/s)"
                rows.append((label, r[name], base, r[name] / base) if name in r
                            else (label, f"unavailable: {unavailable[name]}", base, None))
            if batch == 1:
                # reduced precision against its own limit: the same matrices in half (bf16) or a quarter (int8) of
                # the bytes, read at the fp32 matrix-by-matrix speed
                for name, fraction in (("minhub bf16", 2), ("minhub bf16 packed", 2), ("minhub int8", 4),
                                       ("minhub int8 compile_decode", 4)):
                    if name in r:
                        share = r[name] / (fraction * matrix_roofline)
                        print(f"  {name}: {share:.0%} of its own matrix-by-matrix roofline (1/{fraction} the bytes)")
                        rows.append((f"decode, batch 1, {name}, share of its own roofline (1/{fraction} the bytes)",
                                     share, base / matrix_roofline, None))
                for name in ("minhub fp32", "minhub fp32 eager step", "minhub fp32 BLAS only",
                             "minhub fp32 compile_decode"):
                    if name not in r:
                        continue
                    print(f"  {name}: {r[name] / matrix_roofline:.0%} of the matrix-by-matrix roofline; transformers "
                          f"{base / matrix_roofline:.0%}", flush=True)
                    rows.append((f"decode, batch 1, {name}, share of the matrix-by-matrix roofline",
                                 r[name] / matrix_roofline, base / matrix_roofline, r[name] / base))

        idx = torch.randint(0, 50257, (1, 512), generator=g)
        r = paired({"ours": lambda: _timed(lambda: ours(model, idx, 1)),
                    "theirs": lambda: _timed(lambda: theirs(ref, idx, 1))}, args.rounds)
        print(f"time to first token, 512-token prompt: minhub {r['ours'] * 1e3:.0f} ms, transformers "
              f"{r['theirs'] * 1e3:.0f} ms (lower is better)", flush=True)
        rows.append(("time to first token, 512-token prompt, fp32 (ms)", r["ours"] * 1e3, r["theirs"] * 1e3,
                     r["ours"] / r["theirs"]))

        # reduced precision's accuracy: teacher-forced over one 512-token sequence, against the fp32 model
        logits32 = model(idx)[0]
        accuracy = {}
        for name, reduced_model in reduced.items():
            logits = (stepwise_logits(reduced_model, idx) if "decode steps" in name else reduced_model(idx))[0].float()
            agree = (logits32.argmax(-1) == logits.argmax(-1)).float().mean().item()
            accuracy[name] = (agree, (logits32 - logits).abs().max().item())
            print(f"{name} vs fp32, teacher-forced 512 tokens: top-1 agreement {agree:.1%}, max |dlogit| "
                  f"{accuracy[name][1]:.3f} (logit range {logits32.min():.1f}..{logits32.max():.1f})", flush=True)

    del ref
    gc.collect()
    load = load_benchmark(model_dir, args.rounds)
    o, t = load["ours"], load["theirs"]
    print(f"load, whole process: minhub {o['seconds']:.2f} s, transformers {t['seconds']:.2f} s, "
          f"speed-up {t['seconds'] / o['seconds']:.2f}x; peak RSS minhub {o['peak_rss'] / 1e6:.0f} MB "
          f"({(o['peak_rss'] - o['rss_after_torch_import']) / weight_bytes:.2f}x the weights above the torch import), "
          f"transformers {t['peak_rss'] / 1e6:.0f} MB "
          f"({(t['peak_rss'] - t['rss_after_torch_import']) / weight_bytes:.2f}x)", flush=True)
    rows.append(("load + first forward, whole process (s)", o["seconds"], t["seconds"], o["seconds"] / t["seconds"]))
    rows.append(("load peak RSS (MB)", o["peak_rss"] / 1e6, t["peak_rss"] / 1e6, None))
    rows.append(("load peak RSS above `import torch`, x weight bytes",
                 (o["peak_rss"] - o["rss_after_torch_import"]) / weight_bytes,
                 (t["peak_rss"] - t["rss_after_torch_import"]) / weight_bytes, None))

    if args.long:
        with torch.inference_mode():
            idx = torch.randint(0, 50257, (1, 32), generator=g)
            stamps, rss = [], []
            from minhub import generate_stream

            t0 = time.perf_counter()
            for step, _ in enumerate(generate_stream(model, idx, args.long, temperature=0,
                                                     window_shift=args.window_shift)):
                if step % 100 == 99:
                    stamps.append(time.perf_counter() - t0)
                    rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            per_token = [1e3 * (b - a) / 100 for a, b in zip([0.0] + stamps, stamps)]
            print(f"long generation (window_shift={args.window_shift}), ms/token per 100 tokens: "
                  + " ".join(f"{x:.1f}" for x in per_token))
            print("long generation, peak RSS (MB) per 100 tokens: " + " ".join(f"{x:.0f}" for x in rss))

    print(f"\n{machine()}; read bandwidth {bw:.1f} GB/s (1 GiB), {matrix_bw:.1f} GB/s (weight matrices in turn)\n")
    for name, (agree, delta) in accuracy.items():
        print(f"{name} vs fp32: teacher-forced top-1 agreement {agree:.1%}, max |dlogit| {delta:.3f}")
    print()
    cells = []
    for name, a, b, ratio in rows:
        fmt = (lambda x: f"{x:.0%}") if "roofline" in name else (lambda x: f"{x:.2f}" if x < 10 else f"{x:.1f}")
        cells.append([name, a if isinstance(a, str) else fmt(a), fmt(b), "" if ratio is None else f"{ratio:.2f}x"])
    print_table(["GPT-2 124M, CPU, greedy", "minhub", "transformers fp32", "minhub / transformers"], cells)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A markdown table, as docs/speed.md holds them."""
    for row in [header, ["---"] * len(header), *rows]:
        print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
    main()
