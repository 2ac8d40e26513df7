"""Deliberate defects, one at a time, each against the tests that cover its module: a defect the tests let through
is a hole in the suite. Run from the repository root:

    python tests/mutants.py            # every defect (about 15 minutes on 2 cores)
    python tests/mutants.py top-p      # those whose name contains "top-p"

Each defect is applied to a copy of the repository in a temporary directory (the working tree is never touched),
where `python -m pytest -x` runs the tests named beside it; pytest's exit status says whether they caught it. The
table it prints ends with the count of defects that survived; the exit status is 1 if any did, or if a run says
nothing either way (pytest selected no test, could not collect, or ran past TIMEOUT).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 900  # seconds for one defect's tests


@dataclass(frozen=True)
class Defect:
    name: str
    file: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (text that occurs exactly once, what replaces it)
    tests: tuple[str, ...]  # pytest arguments: files, -k expressions


DEFECTS = (
    Defect("train: constant learning rate", "minhub/train.py",
           (('    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""\n',
             '    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""\n    return config.lr\n'),),
           ("tests/test_train.py",)),
    Defect("train: weight decay on every parameter", "minhub/train.py",
           (("    decay = [p for p in params if id(p) in matrices]\n", "    decay = list(params)\n"),
            ("    no_decay = [p for p in params if id(p) not in matrices]\n", "    no_decay = []\n")),
           ("tests/test_train.py",)),
    Defect("train: DDP without the gradient all-reduce", "minhub/train.py",
           (("sync = world == 1 or micro == config.grad_accum - 1", "sync = world == 1"),),
           ("tests/test_train.py", "-k", "ddp")),
    Defect("train: accumulated gradients not averaged", "minhub/train.py",
           (("y.flatten()) / config.grad_accum", "y.flatten())"),),
           ("tests/test_train.py",)),
    Defect("serve: logits - max instead of log-probabilities", "minhub/serve.py",
           (("logprobs = logits.float().log_softmax(-1)",
             "logprobs = logits.float() - logits.float().amax(-1, keepdim=True)"),),
           ("tests/test_serve.py",)),
    Defect("matmul: the plan takes the slowest kernel", "minhub/matmul.py",
           (("best = min(candidates, key=seconds.get)", "best = max(candidates, key=seconds.get)"),),
           ("tests/test_matmul.py", "-k", "plan")),
    Defect("matmul: bf16 bias dropped by minhub::linear", "minhub/matmul.py",
           (("            return minhub_linear(x, weight, bias)\n",
             "            return minhub_linear(x, weight, bias if x.dtype == torch.float32 else None)\n"),),
           ("tests/test_matmul.py", "-k", "bfloat16")),
    Defect("matmul: oneDNN dropped from compiled steps", "minhub/matmul.py",
           (("(onednn_linear_op if torch.compiler.is_compiling() else onednn_linear)", "onednn_linear"),),
           ("tests/test_speed.py", "-k", "compiled_fp32")),
    Defect("generation: top-p keeps only the argmax", "minhub/generation.py",
           (("outside = probs.cumsum(-1) - probs >= top_p", "outside = probs.cumsum(-1) - probs > 0"),),
           ("tests/test_generate.py",)),
    Defect("generation: top-p drops the token that crosses top_p", "minhub/generation.py",
           (("outside = probs.cumsum(-1) - probs >= top_p", "outside = probs.cumsum(-1) >= top_p"),),
           ("tests/test_generate.py",)),
    Defect("speed: int8 bias dropped by minhub::linear", "minhub/speed.py",
           (("matmul.minhub_linear(x.contiguous(), self.weight, self.bias, self.scale)",
             "matmul.minhub_linear(x.contiguous(), self.weight, None, self.scale)"),),
           ("tests/test_speed.py", "-k", "int8")),
    Defect("precompiled: minhub::attend given half the attention scale", "minhub/precompiled.py",
           (("(torch.ops.minhub.attend.default, (q, k, v, float(scale)))",
             "(torch.ops.minhub.attend.default, (q, k, v, 0.5 * float(scale)))"),),
           ("tests/test_precompiled.py", "-k", "transformers")),
    Defect("contract: a forward of fewer rows writes the cache's last rows", "minhub/gpt2.py",
           (("        self.k[:B, :, start:end] = k\n        self.v[:B, :, start:end] = v\n"
             "        return self.k[:B, :, :end], self.v[:B, :, :end]",
             "        self.k[-B:, :, start:end] = k\n        self.v[-B:, :, start:end] = v\n"
             "        return self.k[-B:, :, :end], self.v[-B:, :, :end]"),),
           ("tests/test_serve.py", "tests/test_contract.py")),
    Defect("serve: a new row prefilled over the row already in cache row 0", "minhub/serve.py",
           (("        if self.rows[0] is not None:\n            self._move_row(0, self._free_slots()[0])\n", ""),),
           ("tests/test_serve.py",)),
    Defect("gpt4: padded rows count positions by slot", "minhub/gpt4.py",
           (("            pos = (attention_mask[:, :start + T].cumsum(-1) - 1).clamp(min=0)",
             "            pos = torch.arange(start + T, device=tokens.device).expand(B, -1)"),),
           ("tests/test_gpt4.py", "-k", "padded")),
    Defect("engine: the model's padding mask left out of decode steps", "minhub/generation.py",
           (("            logits = step_forward(token[:, None], n, model_mask)[:, -1]",
             "            logits = step_forward(token[:, None], n)[:, -1]"),),
           ("tests/test_generate.py", "tests/test_contract.py")),
    Defect("gpt2: the final LayerNorm's epsilon ignored", "minhub/gpt2.py",
           (("ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)",
             "ln_f=nn.LayerNorm(config.n_embd, eps=1e-3)"),),
           ("tests/test_gpt2_loading.py",)),
)


def copy_of_repository(directory: Path) -> Path:
    """The files a test run needs (the package, the tests, pyproject.toml) under `directory`."""
    for name in ("minhub", "tests"):
        shutil.copytree(ROOT / name, directory / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", directory)
    return directory


def run(defect: Defect) -> tuple[bool | None, float, str]:
    """(caught, or None where the run says nothing either way; seconds; the last line pytest printed)."""
    with tempfile.TemporaryDirectory(prefix="minhub-mutant-") as tmp:
        copy = copy_of_repository(Path(tmp))
        path = copy / defect.file
        text = path.read_text()
        for old, new in defect.edits:
            if text.count(old) != 1:
                raise SystemExit(f"{defect.name}: {old!r} occurs {text.count(old)} times in {defect.file}")
            text = text.replace(old, new)
        path.write_text(text)
        start = time.perf_counter()
        # the copy comes first on sys.path, before any installed minhub: in pytest (python -m puts the working
        # directory there) and in the processes tests start (PYTHONPATH), such as DDP workers
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")]))}
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *defect.tests],
                                  cwd=copy, capture_output=True, text=True, env=env, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            return None, time.perf_counter() - start, f"no answer in {TIMEOUT} s"
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        last = lines[-1] if lines else done.stderr[-200:]
        # pytest's 1: tests failed. Anything else (no test selected, a collection error) says nothing of the defect
        caught = {0: False, 1: True}.get(done.returncode)
        seconds = time.perf_counter() - start
        return caught, seconds, last if caught is not None else f"pytest exit {done.returncode}: {last}"


def main(argv: list[str]) -> int:
    chosen = [d for d in DEFECTS if not argv or any(a in d.name for a in argv)]
    results = []
    print("| defect | tests | result | seconds |\n|---|---|---|---|")
    for defect in chosen:
        caught, seconds, last = run(defect)
        results.append(caught)
        result = {True: "caught", False: f"**survived** ({last})", None: f"**no verdict** ({last})"}[caught]
        print(f"| {defect.name} | `{' '.join(defect.tests)}` | {result} | {seconds:.0f} |", flush=True)
    print(f"\n{results.count(True)} of {len(chosen)} caught, {results.count(False)} survived, "
          f"{results.count(None)} without a verdict")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
