"""The matmul plan (minhub.matmul) and its C++ kernel: minhub::linear equals float64 sums in every layout, dtype and
row count, on its AVX2 and its portable loops; every plan gives transformers' logits and greedy tokens; the plan is
measured once per machine and read back from disk; a CPU without a compiler (or with a broken one) or without oneDNN
gets PyTorch's kernels.

Each branch is tested on any CPU by forcing its plan (the kernels run for real); the measurement's fallbacks by
replacing the capability probe (minhub.hardware.cpu_info) with one that lacks the feature."""

import dataclasses
import json
import shutil
import time

import pytest
import torch
import torch.nn as nn
from helpers import hf_gpt2, save_checkpoint
from plans import PLANS, assert_close_in_bf16, bf16_reference, fake_cpu, forced_plan, library

from minhub import generate, gpt2_from_pretrained, hardware, matmul, pad_left
from minhub.speed import Int8Linear
from minhub.matmul import CPULinear, MatmulPlan, minhub_linear

CPU = hardware.cpu_info()
VOCAB = 101


# --------------------------------------------------------------------------------------------------------------------
# minhub::linear itself


def operands(case: str, rows: int, n: int, k: int):
    """x (rows, 1, k), a weight (n, k) in the case's dtype and layout, bias, scale (int8 only)."""
    if case == "int8":
        x = torch.randn(rows, 1, k).bfloat16()
        weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        return x, weight, torch.randn(n).bfloat16(), (torch.rand(n) + 0.5).bfloat16()
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    weight = torch.randn(n, k).to(dtype)
    if case == "float32 columns":  # the hub's GPT-2 storage: (in, out), seen as (out, in)
        weight = weight.t().contiguous().t()
    return torch.randn(rows, 1, k).to(dtype), weight, torch.randn(n).to(dtype), None


@pytest.mark.parametrize("portable", [False, True], ids=["avx2-where-present", "portable"])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("case", ["float32 rows", "float32 columns", "bfloat16", "int8"])
# the last two span several chunks of work (256 kB of rows; 1 MB of the stored (k, n) matrix in the (in, out) layout)
@pytest.mark.parametrize("n,k", [(64, 96), (37, 45), (8, 3088), (602, 1000), (40, 30011)])
def test_minhub_linear_equals_float64_sums(case, rows, portable, n, k):
    library()
    x, weight, bias, scale = operands(case, rows, n, k)
    with torch.inference_mode():
        out = minhub_linear(x, weight, bias, scale, portable=portable)
        no_bias = minhub_linear(x, weight, None, scale, portable=portable)
    scales = scale.double() if scale is not None else 1
    exact = x.double() @ weight.double().T * scales
    magnitude = x.double().abs() @ weight.double().abs().T * (scales if scale is None else scales.abs())
    # float32 sums in another order, then (bf16 activations) the output's rounding to bf16
    tolerance = 1e-5 * magnitude if x.dtype == torch.float32 else 2e-5 * magnitude + 2 ** -8 * exact.abs()
    assert out.shape == (rows, 1, n) and out.dtype == x.dtype
    assert ((no_bias.double() - exact).abs() <= tolerance).all()
    assert ((out.double() - (exact + bias.double())).abs() <= tolerance + 2 ** -8 * bias.double().abs()).all()


@pytest.mark.parametrize("case", ["float32 rows", "float32 columns", "int8"])
def test_minhub_linear_gives_the_same_bits_whichever_thread_takes_which_chunk(case, two_threads):
    library()
    x, weight, bias, scale = operands(case, 3, 40, 30011)
    with torch.inference_mode():
        first = minhub_linear(x, weight, bias, scale)
        assert all(torch.equal(minhub_linear(x, weight, bias, scale), first) for _ in range(30))


def test_minhub_linear_refuses_what_it_cannot_multiply():
    library()
    x = torch.randn(1, 6)
    with pytest.raises(RuntimeError, match="do not multiply"):
        minhub_linear(x, torch.randn(4, 5), None)
    with pytest.raises(RuntimeError, match="row-major"):
        minhub_linear(x, torch.randn(4, 12)[:, ::2], None)  # neither layout
    with pytest.raises(RuntimeError, match="row-major"):
        minhub_linear(x.bfloat16(), torch.randn(6, 4).bfloat16().t(), None)  # bf16 columns are not read
    with pytest.raises(RuntimeError, match="need their scales"):
        minhub_linear(x.bfloat16(), torch.ones(4, 6, dtype=torch.int8), None)
    with pytest.raises(RuntimeError, match="weight with"):
        minhub_linear(x, torch.randn(4, 6).double(), None)
    with pytest.raises(RuntimeError, match="one per output row"):
        minhub_linear(x, torch.randn(4, 6), torch.randn(5))
    with pytest.raises(RuntimeError, match="no input features"):
        minhub_linear(torch.randn(3, 0), torch.randn(4, 0), None)


@pytest.mark.parametrize("portable", [False, True], ids=["avx2-where-present", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,keys,head_size", [(1, 12, 12, 1, 64), (1, 12, 12, 70, 64),
                                                                 (2, 3, 3, 5, 13), (1, 4, 4, 600, 32),
                                                                 (2, 9, 3, 40, 64), (1, 4, 1, 33, 16)])
def test_minhub_attend_equals_float64_attention(dtype, portable, batch, heads, kv_heads, keys, head_size):
    library()
    # keys and values as a decode step reads them: the first slots of a longer (B, H, slots, D) KV cache; fewer
    # key/value heads than query heads: grouped-query attention (SDPA's enable_gqa grouping)
    cache_k = torch.randn(batch, kv_heads, keys + 7, head_size).to(dtype)
    cache_v = torch.randn(batch, kv_heads, keys + 3, head_size).to(dtype)  # other strides than the keys
    q = torch.randn(batch, 1, heads, head_size).to(dtype).transpose(1, 2)  # (B, H, 1, D), not contiguous
    k, v = cache_k[:, :, :keys], cache_v[:, :, :keys]
    scale = head_size ** -0.5
    with torch.inference_mode():
        out = torch.ops.minhub.attend(q, k, v, scale, portable)
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale,
                                                             enable_gqa=kv_heads != heads)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    # float32 sums, then (bf16) the output's rounding
    tolerance = 1e-5 if dtype == torch.float32 else 1e-5 + 2 ** -8 * exact.abs()
    assert ((out.double() - exact).abs() <= tolerance).all()


def test_minhub_attend_refuses_what_it_cannot_attend():
    library()
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 5, 8)
    with pytest.raises(RuntimeError, match="one query"):
        torch.ops.minhub.attend(torch.randn(1, 4, 2, 8), k, k, 1.0)
    with pytest.raises(RuntimeError, match="k and v of shape"):
        torch.ops.minhub.attend(q, k, torch.randn(1, 4, 6, 8), 1.0)
    with pytest.raises(RuntimeError, match="k and v of shape"):
        torch.ops.minhub.attend(q, torch.randn(1, 4, 0, 8), torch.randn(1, 4, 0, 8), 1.0)
    with pytest.raises(RuntimeError, match="k and v of shape"):  # 4 query heads do not share 3 key heads evenly
        torch.ops.minhub.attend(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8), 1.0)
    with pytest.raises(RuntimeError, match="in one dtype"):
        torch.ops.minhub.attend(q, k.bfloat16(), k, 1.0)
    with pytest.raises(RuntimeError, match="last dimension"):
        torch.ops.minhub.attend(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, 1.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.minhub.attend(q.double(), k.double(), k.double(), 1.0)


# --------------------------------------------------------------------------------------------------------------------
# Plans applied to a model


@pytest.fixture(scope="module")
def reference():
    return hf_gpt2(seed=11, n_positions=48, n_layer=3, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    return save_checkpoint(reference, tmp_path_factory.mktemp("ckpt"), "openai")


def load_with(checkpoint, plan_name: str, monkeypatch, dtype=torch.float32):
    plan = forced_plan(plan_name)
    monkeypatch.setenv("MINHUB_MATMUL", "blas")  # plain nn.Linear, the hub's layout; then the forced plan
    model = gpt2_from_pretrained(checkpoint, dtype=dtype)
    assert type(model.lm_head) is nn.Linear
    return matmul.use_fastest(model, plan)


def stepwise_logits(model, idx):
    """Teacher-forced logits (B, T, V) one token at a time against the KV cache: the decode path."""
    model.setup_cache(idx.size(0))
    return torch.cat([model(idx[:, t:t + 1], t) for t in range(idx.size(1))], dim=1)


@pytest.mark.parametrize("plan_name", PLANS)
@pytest.mark.parametrize("batch", [1, 3])
def test_every_plan_decodes_transformers_logits_and_tokens(checkpoint, reference, plan_name, batch, monkeypatch):
    model = load_with(checkpoint, plan_name, monkeypatch)
    idx = torch.randint(0, VOCAB, (batch, 30))
    with torch.inference_mode():
        ours = stepwise_logits(model, idx)
        theirs = reference(idx).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
        assert (model(idx) - theirs).abs().max().item() <= 1e-4  # the prompt's path: more rows, BLAS
    prompt = idx[:, :5]
    expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                                  min_new_tokens=40, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, prompt, 40, temperature=0), expected)


@pytest.mark.parametrize("plan_name", PLANS)
def test_a_padded_batch_decodes_as_each_prompt_alone(checkpoint, plan_name, monkeypatch):
    model = load_with(checkpoint, plan_name, monkeypatch)
    prompts = [[1, 2, 3, 4], [5], [6, 7]]
    idx, mask = pad_left(prompts, pad_id=0)
    batched = generate(model, idx, 12, temperature=0, attention_mask=mask)
    for row, prompt in zip(batched, prompts):
        alone = generate(model, torch.tensor([prompt]), 12, temperature=0)[0]
        assert torch.equal(row[-12:], alone[-12:])


def ops_run(model, idx, pos):
    with torch.inference_mode(), torch.profiler.profile() as prof:
        model(idx, pos)
    return {event.key for event in prof.key_averages()}


BLAS = {"aten::addmm", "aten::mm"}


@pytest.mark.parametrize("plan_name", PLANS)
def test_each_row_count_takes_the_planned_kernel(checkpoint, plan_name, monkeypatch):
    model = load_with(checkpoint, plan_name, monkeypatch)
    for batch, one_row in ((1, True), (3, False)):
        planned = model.lm_head.plan.kernel(torch.float32, one_row)
        model.setup_cache(batch)
        with torch.inference_mode():
            model(torch.tensor([[1, 2]] * batch), 0)
        ops = ops_run(model, torch.tensor([[3]] * batch), 2)
        assert ("minhub::linear" in ops) == (planned == "minhub"), ops
        assert ("mkldnn::_linear_pointwise" in ops) == (planned == "onednn"), ops
        assert bool(ops & BLAS) == (planned == "blas"), ops


def test_the_minhub_plan_keeps_weights_training_and_other_dtypes_working(checkpoint, reference, monkeypatch):
    model = load_with(checkpoint, "minhub", monkeypatch)
    assert not model.transformer.h[0].mlp.c_fc.weight.is_contiguous()  # the hub's layout, read as it is
    state = {k: v for k, v in model.state_dict().items()}
    plain = gpt2_from_pretrained(checkpoint)
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied

    # training takes nn.Linear's path: same gradients as the plain model
    idx = torch.randint(0, VOCAB, (2, 20))
    for m in (model, plain):
        m.train()
        m.config.embd_pdrop = m.config.attn_pdrop = m.config.resid_pdrop = 0.0
        for block in m.transformer.h:
            block.attn.attn_pdrop = block.attn.resid_pdrop = block.mlp.resid_pdrop = 0.0
        torch.nn.functional.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    assert (model.lm_head.weight.grad - plain.lm_head.weight.grad).abs().max().item() < 1e-5
    model.eval()

    model.to(torch.bfloat16)  # bf16 in the (in, out) layout, which minhub::linear does not read: nn.Linear's path
    with torch.inference_mode(), torch.profiler.profile() as prof:
        assert model(idx[:1, :1]).dtype == torch.bfloat16
    ops = {event.key for event in prof.key_averages()}
    assert "minhub::linear" in ops and ops & BLAS  # the row-major lm_head through minhub, the rest through BLAS


@pytest.mark.parametrize("plan_name", ["blas", "minhub"])
def test_a_bfloat16_prompt_takes_the_planned_kernel_within_bf16_rounding_of_transformers(checkpoint, reference,
                                                                                         plan_name, monkeypatch):
    """More than FEW_ROWS rows of bf16 (a prompt, scoring): minhub::linear where the plan says so (AVX2 CPUs, where
    PyTorch's bf16 product takes a decode step's time per row), PyTorch's otherwise."""
    model = load_with(checkpoint, plan_name, monkeypatch, dtype=torch.bfloat16)
    idx = torch.randint(0, VOCAB, (2, 24))  # 48 rows, and 24 for the lm_head of one row's prompt below
    planned = model.lm_head.plan.prompt_kernel(torch.bfloat16)
    assert planned == {"blas": "blas", "minhub": "minhub"}[plan_name]
    with torch.inference_mode(), torch.profiler.profile() as prof:
        ours = model(idx)
    ops = {event.key for event in prof.key_averages()}
    assert ("minhub::linear" in ops) == (planned == "minhub"), ops
    assert bool(ops & BLAS) == (planned == "blas"), ops
    assert_close_in_bf16(ours, *bf16_reference(reference, idx))
    assert matmul.MatmulPlan().prompt_kernel(torch.float32) == "blas"  # fp32 prompts: BLAS's blocked products


@pytest.mark.parametrize("plan_name", ["blas", "minhub", "blas one row + minhub few rows"])
@pytest.mark.parametrize("batch", [1, 3])
def test_bfloat16_decodes_within_bf16_rounding_of_transformers_bf16(checkpoint, reference, plan_name, batch,
                                                                    monkeypatch):
    model = load_with(checkpoint, plan_name, monkeypatch, dtype=torch.bfloat16)
    assert model.transformer.h[0].mlp.c_fc.weight.is_contiguous()  # row-major for bf16 whatever the kernel
    idx = torch.randint(0, VOCAB, (batch, 30))
    with torch.inference_mode():
        ours = stepwise_logits(model, idx)
    assert_close_in_bf16(ours, *bf16_reference(reference, idx))  # within 2x what bf16 costs transformers
    planned = model.lm_head.plan.kernel(torch.bfloat16, one_row=batch == 1)
    ops = ops_run(model, idx[:, :1], 30)
    assert ("minhub::linear" in ops) == (planned == "minhub"), ops
    assert bool(ops & BLAS) == (planned == "blas"), ops


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_through_minhub_linear_is_the_dequantized_weight_times_the_input(rows, dtype):
    library()
    linear = nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.normal_(0, 0.3)
    ours, theirs = Int8Linear(linear, dtype, use_minhub=True), Int8Linear(linear)  # theirs: PyTorch's int8 kernel
    x = torch.randn(rows, 1, 96).to(dtype)
    dequantized = ours.weight.double() * ours.scale.double()[:, None]
    exact = x.double() @ dequantized.T + ours.bias.double()
    with torch.inference_mode(), torch.profiler.profile() as prof:
        out = ours(x)
    assert "minhub::linear" in {event.key for event in prof.key_averages()}
    assert out.dtype == dtype and out.shape == (rows, 1, 40)
    # float32 sums of the same dequantized weights: float32 rounding, or the output's rounding to bf16
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert ((out.double() - exact).abs() <= tolerance * (exact.abs() + 1)).all()
    with torch.inference_mode():
        expected = theirs(x.bfloat16()).float()
    assert (out.float() - expected).abs().max().item() <= 0.02 * expected.abs().max().item()


# --------------------------------------------------------------------------------------------------------------------
# The plan: measured once, kept, and what a machine without a feature gets


def test_the_plan_is_measured_once_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "others_share", lambda start, end: 0.0)  # an idle machine: the plan is final
    built = matmul.library_path()
    monkeypatch.setenv("MINHUB_CACHE", str(tmp_path))
    monkeypatch.setattr(matmul, "_plans", {})
    if built.is_file():  # a library already built is measured, not built again
        matmul.library_path().parent.mkdir(parents=True)
        shutil.copy(built, matmul.library_path())
    first = matmul.plan()
    saved = tmp_path / matmul.machine_key() / "plan.json"
    if first.library is not None:
        assert first.library == str(matmul.library_path()) and str(tmp_path) in first.library
    assert json.loads(saved.read_text())["kernels"] == first.kernels
    assert set(first.measured_gbs) >= {"float32 one row: blas", "float32 few rows: blas", "int8 one row: blas"}

    def no_measuring(library_file):
        raise AssertionError("measured again")

    monkeypatch.setattr(matmul, "measure", no_measuring)
    monkeypatch.setattr(matmul, "_plans", {})  # a new process
    assert matmul.plan() == first

    saved.write_text("{not json")  # a corrupt plan is measured again, not trusted
    monkeypatch.setattr(matmul, "_plans", {})
    remeasured = MatmulPlan(notes=("measured again",))
    monkeypatch.setattr(matmul, "measure", lambda library_file: remeasured)
    assert matmul.plan() == remeasured
    assert json.loads(saved.read_text())["notes"] == ["measured again"]


@pytest.mark.parametrize("idle_later", [True, False])
def test_a_plan_measured_on_a_busy_machine_is_measured_again_once_it_is_idle(tmp_path, monkeypatch, caplog,
                                                                              idle_later):
    monkeypatch.setenv("MINHUB_CACHE", str(tmp_path))
    monkeypatch.setattr(matmul, "_plans", {})
    fake_cpu(monkeypatch, cxx=None)  # nothing to build
    shares = iter([0.6])  # other processes used 60% of the CPUs while measuring
    monkeypatch.setattr(hardware, "others_share", lambda start, end: next(shares))
    monkeypatch.setattr(matmul, "_timed_rounds", lambda candidates, rounds: {name: 0.01 for name in candidates})
    busy = matmul.plan()
    assert busy.provisional and busy.others_busy == 0.6 and "provisional" in busy.describe()
    assert json.loads((tmp_path / matmul.machine_key() / "plan.json").read_text())["others_busy"] == 0.6

    monkeypatch.setattr(matmul, "_plans", {})  # a new process: the idle check, then the measurement if idle
    shares = iter([0.0, 0.0] if idle_later else [0.5])
    again = matmul.plan()
    assert again.provisional is not idle_later
    assert ("idle now: measuring again" in caplog.text) is idle_later
    if idle_later:  # the final plan is kept: the next process reads it without checking or measuring
        monkeypatch.setattr(matmul, "_plans", {})
        monkeypatch.setattr(matmul, "measure", lambda library_file: pytest.fail("measured again"))
        assert matmul.plan() == again


def test_without_proc_stat_a_plan_is_final_and_never_measured_again(tmp_path, monkeypatch):
    """No /proc/stat (not Linux): nothing tells a busy machine from an idle one, so the plan is kept as measured."""
    monkeypatch.setenv("MINHUB_CACHE", str(tmp_path))
    monkeypatch.setattr(matmul, "_plans", {})
    monkeypatch.setattr(hardware, "cpu_times", lambda: None)
    fake_cpu(monkeypatch, cxx=None)
    monkeypatch.setattr(matmul, "_timed_rounds", lambda candidates, rounds: {name: 0.01 for name in candidates})
    plan = matmul.plan()
    assert plan.others_busy is None and not plan.provisional and not matmul._machine_idle(0.0)
    monkeypatch.setattr(matmul, "_plans", {})
    monkeypatch.setattr(matmul, "measure", lambda library_file: pytest.fail("measured again"))
    assert matmul.plan() == plan


def test_other_processes_share_of_the_cpus_is_read_from_proc_stat():
    start = hardware.cpu_times()
    if start is None:
        pytest.skip("no /proc/stat on this system")
    spin = time.perf_counter() + 0.3
    while time.perf_counter() < spin:  # this process's own work is not the others'
        pass
    share = hardware.others_share(start, hardware.cpu_times())
    assert share is not None and 0.0 <= share <= 1.0
    own = hardware.CPUTimes(busy=10.0, total=20.0, own=5.0)
    assert hardware.others_share(own, hardware.CPUTimes(busy=11.0, total=22.0, own=6.0)) == 0.0
    assert hardware.others_share(own, hardware.CPUTimes(busy=12.0, total=22.0, own=5.5)) == 0.75
    assert hardware.others_share(own, own) is None and hardware.others_share(None, own) is None


def test_a_saved_library_that_changed_is_measured_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MINHUB_CACHE", str(tmp_path))
    monkeypatch.setattr(matmul, "_plans", {})
    directory = tmp_path / matmul.machine_key()
    directory.mkdir()
    built = matmul.library_path()
    built.parent.mkdir(parents=True)
    built.write_bytes(b"truncated")  # e.g. by a full disk
    saved = MatmulPlan(kernels={"float32 one row": "minhub"}, library=str(built), library_sha256="0" * 64)
    (directory / "plan.json").write_text(json.dumps(dataclasses.asdict(saved)))
    remeasured = MatmulPlan(notes=("measured again",))
    monkeypatch.setattr(matmul, "measure", lambda library_file: remeasured)
    assert matmul.plan() == remeasured
    assert not built.exists()  # deleted, so that the measurement builds it again
    assert "unusable" in caplog.text and "changed since it was measured" in caplog.text


def test_an_unwritable_cache_still_gives_a_plan(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MINHUB_CACHE", str(blocker / "cache"))  # a directory under a file cannot be made
    monkeypatch.setattr(matmul, "_plans", {})
    fake_cpu(monkeypatch, cxx=None)
    assert matmul.plan().library is None
    assert "MINHUB_CACHE" in caplog.text


def test_without_a_compiler_pytorchs_kernels_are_used(tmp_path, monkeypatch):
    fake_cpu(monkeypatch, cxx=None)
    plan = matmul.measure(tmp_path / matmul.LIBRARY)
    assert "minhub" not in plan.kernels.values() and plan.library is None
    assert not any(name.endswith(": minhub") for name in plan.measured_gbs)
    assert any("no C++ compiler" in note for note in plan.notes)
    assert not list(tmp_path.iterdir())  # nothing was built


def test_a_compiler_that_fails_leaves_pytorchs_kernels_and_says_why(tmp_path, monkeypatch):
    fake_cpu(monkeypatch, cxx=shutil.which("false") or "/bin/false")
    plan = matmul.measure(tmp_path / matmul.LIBRARY)
    assert plan.library is None and "minhub" not in plan.kernels.values()
    assert any("building it failed" in note for note in plan.notes), plan.notes
    assert not (tmp_path / matmul.LIBRARY).exists()


@pytest.mark.parametrize("fastest", [{"one row": "blas", "few rows": "onednn", "many rows": "minhub"},
                                     {"one row": "minhub", "few rows": "blas", "many rows": "blas"},
                                     {"one row": "minhub", "few rows": "minhub", "many rows": "minhub"}], ids=str)
def test_the_plan_takes_the_fastest_measured_kernel_for_every_case(tmp_path, monkeypatch, fastest):
    """The measurement's timings replaced by chosen ones: the plan must name exactly the fastest candidate of
    each weight dtype and row count, and keep the figures it measured."""
    library()  # every candidate can run

    def timed(candidates, rounds):
        # "<dtype> <one row|few rows>: <kernel>" -> 1 ms for the chosen kernel, 2-4 ms for the others
        return {name: 0.001 if name.endswith(f": {fastest[name.split(': ')[0].split(' ', 1)[1]]}")
                else 0.002 + 0.001 * i for i, name in enumerate(candidates)}

    monkeypatch.setattr(matmul, "_timed_rounds", timed)
    plan = matmul.measure(matmul.library_path())
    for dtype in matmul.DTYPES:
        for one_row in (True, False):
            name = matmul.choice_name(dtype, one_row)
            expected = fastest["one row" if one_row else "few rows"]
            if f"{name}: {expected}" not in plan.measured_gbs:  # oneDNN is no candidate for bf16 and int8
                expected = "blas"
            assert plan.kernel(dtype, one_row) == expected, (name, plan.kernels)
    assert plan.prompt_kernel(torch.bfloat16) == fastest["many rows"], plan.kernels
    # kept whatever the choices: minhub::attend is in it, and every process reading the plan loads it
    assert plan.library == str(matmul.library_path())


def test_this_machines_plan_took_its_fastest_measured_kernels():
    plan = matmul.plan()
    for dtype in matmul.DTYPES:
        for one_row in (True, False):
            name = matmul.choice_name(dtype, one_row)
            measured = {k.rpartition(": ")[2]: v for k, v in plan.measured_gbs.items() if k.startswith(f"{name}: ")}
            assert measured[plan.kernel(dtype, one_row)] == max(measured.values()), (name, measured)
    prompt = {k.rpartition(": ")[2]: v for k, v in plan.measured_gbs.items() if k.startswith(matmul.BF16_PROMPT)}
    if plan.library is not None:
        assert prompt[plan.prompt_kernel(torch.bfloat16)] == max(prompt.values()), prompt


def test_without_onednn_few_rows_stay_off_onednn(tmp_path, monkeypatch):
    fake_cpu(monkeypatch, cxx=None, onednn=False)
    plan = matmul.measure(tmp_path / matmul.LIBRARY)
    assert "onednn" not in plan.kernels.values() and "float32 few rows: onednn" not in plan.measured_gbs
    assert any("no oneDNN" in note for note in plan.notes)


def test_the_plan_depends_on_the_machine_and_the_kernels_source(monkeypatch, tmp_path):
    key = matmul.machine_key()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert matmul.machine_key() != key
    monkeypatch.undo()
    fake_cpu(monkeypatch, model="Another CPU")
    assert matmul.machine_key() != key
    monkeypatch.undo()
    library = matmul.library_path()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert matmul.library_path() == library  # every thread count's plan shares the library
    monkeypatch.undo()
    edited = tmp_path / "matmul.cpp"
    edited.write_text(matmul.SOURCE.read_text() + "\n// an edit\n")
    monkeypatch.setattr(matmul, "SOURCE", edited)
    assert matmul.machine_key() != key and matmul.library_path() != library


def test_minhub_matmul_blas_gives_plain_linears_and_nonsense_is_refused(checkpoint, monkeypatch):
    monkeypatch.setenv("MINHUB_MATMUL", "blas")
    model = gpt2_from_pretrained(checkpoint)
    assert not any(isinstance(m, CPULinear) for m in model.modules())
    monkeypatch.setenv("MINHUB_MATMUL", "fastest")
    with pytest.raises(ValueError, match="MINHUB_MATMUL='fastest'.*auto.*blas"):
        gpt2_from_pretrained(checkpoint)


def test_a_linear_without_inputs_stays_nn_linear():
    empty = matmul.use_fastest(nn.Linear(0, 3), forced_plan("minhub"))
    with torch.inference_mode():
        assert torch.equal(empty(torch.ones(2, 0)), empty.bias.expand(2, 3))


def test_models_on_other_dtypes_are_left_alone(checkpoint):
    model = gpt2_from_pretrained(checkpoint, dtype=torch.float16)
    assert not any(isinstance(m, CPULinear) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loader_lays_the_hub_matrices_out_for_the_plan(checkpoint, reference, dtype, monkeypatch):
    plan = forced_plan("minhub")
    monkeypatch.setitem(matmul._plans, matmul.machine_key(), plan)  # what this machine's measurement would say
    model = gpt2_from_pretrained(checkpoint, dtype=dtype)
    c_fc = model.transformer.h[0].mlp.c_fc
    assert isinstance(c_fc, CPULinear) and c_fc.plan == plan
    # the hub stores (in, out): fp32 is kept so (a column-major view), bf16 is read transposed into row-major
    assert c_fc.weight.is_contiguous() == (dtype == torch.bfloat16)
    assert torch.equal(c_fc.weight, reference.transformer.h[0].mlp.c_fc.weight.t().to(dtype))
    if dtype == torch.float32:
        idx = torch.randint(0, VOCAB, (1, 30))
        with torch.inference_mode():
            assert (stepwise_logits(model, idx) - reference(idx).logits).abs().max().item() <= 1e-4
