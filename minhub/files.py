"""Writing files whole or not at all: minhub's one way to replace a file it keeps.

Checkpoints, tokenizers, token files, the matmul plan: each is written under a temporary name in its own directory,
then moved over the real name with os.replace. On one file system that rename is atomic, so a reader (a loader, a
resumed run, another process) sees the old file or the new one, never half of one, and a crash or Ctrl-C while
writing leaves the previous file in place. The temporary names are unique to the process and the call, so two
processes writing the same file at the same time (two programs measuring the same machine, say) never write into each
other's temporary file: the last rename wins, and what it leaves is whole.

Only a SIGKILL or a power cut in the middle of a write can leave a hidden temporary directory behind
(`.<name>.<host>.<pid>.<random>`, next to the file). It is never read, and the next save of that file on the same
host removes it once no process with that pid runs there (a training run killed again and again would otherwise
pile up a model's worth of bytes each time).
"""

from __future__ import annotations

import os
import glob
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` whole or not at all, whatever another process writes there at the same time."""
    path = Path(path)
    save_atomically(path.parent, [path.name], lambda staging: (staging / path.name).write_bytes(data))


def save_atomically(directory: str | os.PathLike, names: Sequence[str], save: Callable[[Path], object]) -> None:
    """Replace the files `names` in `directory` with the ones `save` writes, each whole or not at all.

    save(staging) writes every one of `names` into `staging`, a new, empty directory of this call's own inside
    `directory` (so the moves are renames on one file system): `lambda d: torch.save(state, d / "train_state.pt")`,
    or a function that writes several files into a directory, such as save_pretrained. Each file then replaces its
    namesake in `directory`, one atomic rename each, in the order of `names`. If `save` raises (or is interrupted),
    nothing in `directory` changes; the staging directory is removed either way."""
    directory = Path(directory)
    prefix = f".{names[0]}.{socket.gethostname()}."
    remove_abandoned(directory, prefix)
    staging = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}.", dir=directory))
    try:
        save(staging)
        for name in names:
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_abandoned(directory: Path, prefix: str) -> None:
    """Delete the staging directories `<prefix><pid>.<random>` in `directory` whose process no longer runs (on this
    host: the prefix names it, and another host's pids mean nothing here)."""
    for staging in directory.glob(glob.escape(prefix) + "*"):
        pid = staging.name[len(prefix):].split(".", 1)[0]
        if staging.is_dir() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but is another user's
        return True
    return True
