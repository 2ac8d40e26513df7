"""The capability probe reads what torch reads, and a device that is not there is a clear error before any work."""

import pytest
import torch
from plans import fake_cpu

from minhub import gpt2_from_pretrained, hardware
from minhub.train import TrainConfig, TrainError, train


def test_the_probe_agrees_with_torch():
    info = hardware.cpu_info()
    assert info.isa == torch.backends.cpu.get_cpu_capability()
    assert info.onednn == torch.backends.mkldnn.is_available()
    assert info.onednn_bf16 == (info.onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert set(info.flags) <= set(hardware.RELEVANT_FLAGS)
    assert info.model and info.model in info.describe()
    if info.onednn and info.onednn_bf16:  # where the probe says yes, the kernel runs
        torch.ops.mkldnn._reorder_linear_weight(torch.randn(8, 8).bfloat16(), 1)
    elif info.onednn:  # where it says no, torch itself refuses: the probe keeps users from that message
        with pytest.raises(RuntimeError, match="bf16 path needs the cpu support"):
            torch.ops.mkldnn._reorder_linear_weight(torch.randn(8, 8).bfloat16(), 1)


def test_check_device():
    assert hardware.check_device(None) == torch.device("cpu")
    assert hardware.check_device("cpu") == torch.device("cpu")
    with pytest.raises(hardware.DeviceError, match=r"'cuda:99' .*Available here: cpu"):
        hardware.check_device("cuda:99")
    with pytest.raises(hardware.DeviceError, match="is not a device name: use cpu, cuda, cuda:N or mps"):
        hardware.check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(hardware.DeviceError, match="'cuda' is not available"):
            hardware.check_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(hardware.DeviceError, match="'mps' is not available"):
            hardware.check_device("mps")


def test_train_refuses_a_missing_device_before_writing_anything(tmp_path):
    data = tmp_path / "input.txt"
    data.write_text("hello world\n" * 200)
    with pytest.raises(TrainError, match="cuda:99"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "run"), device="cuda:99"))
    assert not (tmp_path / "run").exists()


def test_train_compile_without_a_compiler_is_a_train_error(tmp_path, monkeypatch):
    fake_cpu(monkeypatch, cxx=None)
    data = tmp_path / "input.txt"
    data.write_text("hello world\n" * 200)
    with pytest.raises(TrainError, match="--compile needs a C\\+\\+ compiler"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "run"), device="cpu", compile=True))
    assert not (tmp_path / "run").exists()
def test_the_loaders_refuse_a_missing_device_before_reading_weights(tmp_path):
    from minhub import gpt4_from_pretrained

    for load in (gpt2_from_pretrained, gpt4_from_pretrained):  # no such path either: the device is checked first
        with pytest.raises(hardware.DeviceError, match="cuda:99"):
            load(tmp_path / "does-not-matter", device="cuda:99")


