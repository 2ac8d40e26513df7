"""The matmul plan (minhub.matmul): every kernel it can pick gives transformers' logits and greedy tokens, the plan
is measured once per machine and read back from disk, and a CPU without a compiler or oneDNN gets BLAS.

Each branch is tested on any CPU by forcing its plan (the kernels run for real); the measurement's fallbacks by
replacing the capability probe (minhub.hardware.cpu_info) with one that lacks the feature."""

import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn as nn
from helpers import hf_gpt2, save_checkpoint

from minhub import generate, gpt2_from_pretrained, hardware, matmul, pad_left
from minhub.matmul import CPULinear, MatmulPlan

CPU = hardware.cpu_info()
VOCAB = 101


def kernel_path(dtype: torch.dtype = torch.float32) -> str | None:
    """The session's reduction kernel for `dtype` (built by the plan's measurement where a compiler exists)."""
    matmul.plan()
    path = matmul.cache_dir() / matmul.machine_key() / matmul.KERNEL_FILES[dtype]
    return str(path) if path.is_file() else None


needs_kernel = pytest.mark.skipif(not CPU.can_compile, reason=f"the reduction kernel needs a C++ compiler; "
                                                               f"{CPU.describe()}")
needs_onednn = pytest.mark.skipif(not CPU.onednn, reason="needs a PyTorch built with oneDNN")

PLANS = {
    "blas": ("blas", "blas"),
    "reduction + onednn": ("reduction", "onednn"),
    "reduction + blas": ("reduction", "blas"),
    "blas + onednn": ("blas", "onednn"),
}


def forced_plan(name: str) -> MatmulPlan:
    one_row, few_rows = PLANS[name]
    if one_row == "reduction" and not CPU.can_compile:
        pytest.skip(f"the reduction kernel needs a C++ compiler; {CPU.describe()}")
    if one_row == "reduction" and kernel_path() is None:
        pytest.fail(f"a C++ compiler is here but the reduction kernel was not built: {matmul.plan().describe()}")
    if few_rows == "onednn" and not CPU.onednn:
        pytest.skip("needs a PyTorch built with oneDNN")
    reduction = one_row == "reduction"
    return MatmulPlan(kernel=kernel_path() if reduction else None,
                      kernel_bf16=kernel_path(torch.bfloat16) if reduction else None, few_rows=few_rows)


@pytest.fixture(scope="module")
def reference():
    return hf_gpt2(seed=11, n_positions=48, n_layer=3, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    return save_checkpoint(reference, tmp_path_factory.mktemp("ckpt"), "openai")


def load_with(checkpoint, plan_name: str, monkeypatch):
    plan = forced_plan(plan_name)
    monkeypatch.setenv("MINHUB_MATMUL", "blas")  # plain nn.Linear, the hub's layout; then the forced plan
    model = gpt2_from_pretrained(checkpoint)
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


@pytest.mark.parametrize("plan_name", PLANS)
def test_each_row_count_takes_the_planned_kernel(checkpoint, plan_name, monkeypatch):
    model = load_with(checkpoint, plan_name, monkeypatch)
    one_row, few_rows = PLANS[plan_name]
    blas = {"aten::addmm", "aten::mm"}
    model.setup_cache(1)
    with torch.inference_mode():
        model(torch.tensor([[1, 2]]), 0)
    ops = ops_run(model, torch.tensor([[3]]), 2)
    assert bool(ops & blas) == (one_row == "blas"), ops
    model.setup_cache(3)
    with torch.inference_mode():
        model(torch.tensor([[1, 2]] * 3), 0)
    ops = ops_run(model, torch.tensor([[3]] * 3), 2)
    assert ("mkldnn::_linear_pointwise" in ops) == (few_rows == "onednn"), ops
    assert bool(ops & blas) == (few_rows == "blas"), ops


@needs_kernel
def test_the_reduction_plan_keeps_weights_training_and_other_dtypes_working(checkpoint, reference, monkeypatch):
    model = load_with(checkpoint, "reduction + onednn", monkeypatch)
    assert model.transformer.h[0].mlp.c_fc.weight.is_contiguous()  # row-major for the kernel: same values
    state = {k: v for k, v in model.state_dict().items()}
    monkeypatch.setenv("MINHUB_MATMUL", "blas")
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

    model.to(torch.bfloat16)  # other dtypes: BLAS, as nn.Linear
    with torch.inference_mode():
        assert model(idx[:1, :1]).dtype == torch.bfloat16


def test_the_plan_is_measured_once_and_read_back(tmp_path, monkeypatch):
    kernel = kernel_path()
    monkeypatch.setenv("MINHUB_CACHE", str(tmp_path))
    monkeypatch.setattr(matmul, "_plans", {})
    if kernel is not None:  # a kernel already built is measured, not built again (that takes 10-30 s)
        (tmp_path / matmul.machine_key()).mkdir()
        shutil.copy(kernel, tmp_path / matmul.machine_key())
    first = matmul.plan()
    saved = tmp_path / matmul.machine_key() / "plan.json"
    if first.kernel is not None:
        assert first.kernel == str(tmp_path / matmul.machine_key() / matmul.KERNEL_FILES[torch.float32])
    assert json.loads(saved.read_text())["kernel"] == first.kernel
    assert set(first.measured_gbs) >= {"one row: blas", "8 rows: blas"}

    def no_measuring(directory):
        raise AssertionError("measured again")

    monkeypatch.setattr(matmul, "measure", no_measuring)
    monkeypatch.setattr(matmul, "_plans", {})  # a new process
    assert matmul.plan() == first

    saved.write_text("{not json")  # a corrupt plan is measured again, not trusted
    monkeypatch.setattr(matmul, "_plans", {})
    remeasured = MatmulPlan(notes=("measured again",))
    monkeypatch.setattr(matmul, "measure", lambda directory: remeasured)
    assert matmul.plan() == remeasured
    assert json.loads(saved.read_text())["notes"] == ["measured again"]


def test_a_saved_kernel_that_does_not_load_is_measured_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MINHUB_CACHE", str(tmp_path))
    monkeypatch.setattr(matmul, "_plans", {})
    directory = tmp_path / matmul.machine_key()
    directory.mkdir()
    kernel = directory / matmul.KERNEL_FILES[torch.float32]
    kernel.write_bytes(b"not a package")  # e.g. truncated by a full disk
    saved = MatmulPlan(kernel=str(kernel))
    (directory / "plan.json").write_text(json.dumps(dataclasses.asdict(saved)))
    remeasured = MatmulPlan(notes=("measured again",))
    monkeypatch.setattr(matmul, "measure", lambda directory: remeasured)
    assert matmul.plan() == remeasured
    assert not kernel.exists()  # deleted, so that the measurement builds it again
    assert "unusable" in caplog.text


def test_an_unwritable_cache_still_gives_a_plan(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MINHUB_CACHE", str(blocker / "cache"))  # a directory under a file cannot be made
    monkeypatch.setattr(matmul, "_plans", {})
    fake_cpu(monkeypatch, cxx=None)
    assert matmul.plan().kernel is None
    assert "MINHUB_CACHE" in caplog.text


def fake_cpu(monkeypatch, **changes) -> None:
    fake = dataclasses.replace(CPU, **changes)
    monkeypatch.setattr(hardware, "cpu_info", lambda: fake)


def test_without_a_compiler_one_row_stays_on_blas(tmp_path, monkeypatch):
    fake_cpu(monkeypatch, cxx=None)
    plan = matmul.measure(tmp_path)
    assert plan.kernel is None and plan.kernel_bf16 is None
    assert not plan.row_major_for(torch.float32)
    assert any("no C++ compiler" in note for note in plan.notes)
    assert not list(tmp_path.glob("*.pt2"))  # nothing was built


def test_without_onednn_few_rows_stay_on_blas(tmp_path, monkeypatch):
    fake_cpu(monkeypatch, cxx=None, onednn=False)
    plan = matmul.measure(tmp_path)
    assert plan.few_rows == "blas" and "8 rows: onednn" not in plan.measured_gbs
    assert any("no oneDNN" in note for note in plan.notes)


def test_the_plan_depends_on_the_machine(monkeypatch):
    key = matmul.machine_key()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert matmul.machine_key() != key
    monkeypatch.undo()
    fake_cpu(monkeypatch, model="Another CPU")
    assert matmul.machine_key() != key


def test_minhub_matmul_blas_gives_plain_linears_and_nonsense_is_refused(checkpoint, monkeypatch):
    monkeypatch.setenv("MINHUB_MATMUL", "blas")
    model = gpt2_from_pretrained(checkpoint)
    assert not any(isinstance(m, CPULinear) for m in model.modules())
    monkeypatch.setenv("MINHUB_MATMUL", "fastest")
    with pytest.raises(ValueError, match="MINHUB_MATMUL='fastest'.*auto.*blas"):
        gpt2_from_pretrained(checkpoint)


def test_models_on_other_dtypes_are_left_alone(checkpoint):
    model = gpt2_from_pretrained(checkpoint, dtype=torch.float16)
    assert not any(isinstance(m, CPULinear) for m in model.modules())


@pytest.mark.parametrize("plan_name", ["blas + onednn", "reduction + onednn"])
def test_the_loader_lays_the_hub_matrices_out_for_the_plan(checkpoint, reference, plan_name, monkeypatch):
    plan = forced_plan(plan_name)
    monkeypatch.setitem(matmul._plans, matmul.machine_key(), plan)  # what this machine's measurement would say
    model = gpt2_from_pretrained(checkpoint)
    c_fc = model.transformer.h[0].mlp.c_fc
    assert isinstance(c_fc, CPULinear) and c_fc.plan == plan
    # the hub stores (in, out): kept as it is (a column-major view) for BLAS, read transposed for the reduction
    assert c_fc.weight.is_contiguous() == plan.row_major_for(torch.float32)
    assert torch.equal(c_fc.weight, reference.transformer.h[0].mlp.c_fc.weight.t())
    idx = torch.randint(0, VOCAB, (1, 30))
    with torch.inference_mode():
        assert (stepwise_logits(model, idx) - reference(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("plan_name", ["blas", "reduction + blas"])
def test_bfloat16_decodes_close_to_float32_through_its_kernel(checkpoint, reference, plan_name, monkeypatch):
    plan = forced_plan(plan_name)
    monkeypatch.setenv("MINHUB_MATMUL", "blas")
    model = matmul.use_fastest(gpt2_from_pretrained(checkpoint, dtype=torch.bfloat16), plan)
    assert isinstance(model.lm_head, CPULinear)
    assert model.transformer.h[0].mlp.c_fc.weight.is_contiguous()  # row-major for bf16 whatever the kernel
    idx = torch.randint(0, VOCAB, (1, 30))
    with torch.inference_mode():
        ours, ref = stepwise_logits(model, idx).float(), reference(idx).logits
    assert (ours - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9
    ops = ops_run(model, idx[:, :1], 30)
    assert bool(ops & {"aten::addmm", "aten::mm"}) == (plan.kernel_bf16 is None), ops
