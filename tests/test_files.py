"""minhub.files: a file is replaced whole or not at all, and what a killed writer leaves behind is removed by the
next save of that file, never while its writer runs."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from minhub.files import save_atomically, write_atomically

WRITER = """
import sys, time
from pathlib import Path
from minhub.files import save_atomically

def save(staging):
    (staging / "model.bin").write_bytes(b"half")
    print(staging, flush=True)
    time.sleep(600)  # killed here, half-way through a save

save_atomically(Path(sys.argv[1]), ["model.bin"], save)
"""


def test_a_writer_killed_mid_save_leaves_the_old_file_and_the_next_save_removes_its_staging(tmp_path):
    write_atomically(tmp_path / "model.bin", b"old")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        staging = writer.stdout.readline().strip()  # the writer is inside save(), its staging directory made
        assert staging and os.path.isdir(staging)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    assert (tmp_path / "model.bin").read_bytes() == b"old" and os.path.isdir(staging)

    host = socket.gethostname()
    live = tmp_path / f".model.bin.{host}.{os.getpid()}.live"  # a save under way in this (running) process
    elsewhere = tmp_path / ".model.bin.another-host.1.x"  # another host's: its pid means nothing here
    live.mkdir()
    elsewhere.mkdir()
    write_atomically(tmp_path / "model.bin", b"new")
    assert (tmp_path / "model.bin").read_bytes() == b"new"
    assert not os.path.exists(staging)  # the killed writer's
    assert live.is_dir() and elsewhere.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.bin", live.name, elsewhere.name])


def test_a_failed_save_changes_nothing_and_leaves_no_staging(tmp_path):
    write_atomically(tmp_path / "a", b"1")

    def half(staging):
        (staging / "a").write_bytes(b"2")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomically(tmp_path, ["a", "b"], half)
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and (tmp_path / "a").read_bytes() == b"1"
