"""Test setup: every test runs offline against a temporary Hugging Face cache, and measures this CPU's matmul plan
(minhub.matmul) into a temporary minhub cache, once per session.

huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, when it is first imported, so they are set here, before
any test module imports it. The caller's own values are kept for the opt-in network test.
"""

import atexit
import os
import shutil
import tempfile

ORIGINAL_ENV = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HOME")}
HF_CACHE = tempfile.mkdtemp(prefix="minhub-hf-cache-")
MINHUB_CACHE = tempfile.mkdtemp(prefix="minhub-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = HF_CACHE
os.environ["MINHUB_CACHE"] = MINHUB_CACHE  # subprocesses (CLI tests) share it: the plan is measured once
os.environ.pop("MINHUB_MATMUL", None)
os.environ.pop("MINHUB_DECODE", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist's workers share the cores: a torch thread per core in each would oversubscribe them, and OpenMP's
# waiting threads then slow every parallel region (a 2 s training test took 30 s beside the other worker). Each
# worker, and the subprocesses it starts, gets its share; the tests of the kernels' threading take 2 threads.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:  # a caller's own OMP_NUM_THREADS wins
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))
atexit.register(shutil.rmtree, HF_CACHE, True)
atexit.register(shutil.rmtree, MINHUB_CACHE, True)

import pytest  # noqa: E402
import torch  # noqa: E402

if WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def two_threads():
    """At least two torch threads for the test (a worker of a parallel run has fewer): what threads share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


def pytest_report_header(config):
    """Which CPU branches this run takes: tests that need a feature skip with its name, the rest fake its absence."""
    from minhub import hardware, matmul

    return [f"cpu: {hardware.cpu_info().describe()}", f"matmul plan: {matmul.plan().describe()}"]
