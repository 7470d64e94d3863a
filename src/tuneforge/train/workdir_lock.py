"""One training per work dir: an exclusive `fcntl.flock` on `WORK_DIR/.lock`.

The lock is held by rank 0 (or by the parent that relaunches a NPROC_PER_NODE job, which
tells its ranks through `LOCK_HELD_ENV`) from before the work dir is checked or cleared
until the run ends. A second training into the same dir refuses at once, naming the holder
(pid, host, start time) that the holder wrote into the file. The kernel drops a flock when
its process dies, however it dies, so a SIGKILLed run never leaves the dir locked; the file
itself stays (an unlocked `.lock` means nothing).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from tuneforge.errors import UserError

LOCK_NAME = ".lock"
LOCK_HELD_ENV = "TUNEFORGE_WORK_DIR_LOCKED"  # set by a relaunching parent: the work dir it holds


def _holder(lock_file: Path) -> str:
    try:
        text = lock_file.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


@contextlib.contextmanager
def work_dir_lock(work_dir: Path):
    """Hold the lock on `work_dir` (created if missing) for the `with` block; UserError if taken.

    A work dir this call had to create is removed again on the way out when nothing but the
    lock file was written into it (a run that failed before starting leaves no trace).
    """
    work_dir = Path(work_dir)
    if os.environ.get(LOCK_HELD_ENV) == str(work_dir.resolve()):
        yield  # the NPROC_PER_NODE parent holds it for this job
        return
    created = not work_dir.exists()
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the work dir {work_dir}: {exc.strerror or exc}", hint="check train.work_dir") from None
    lock_file = work_dir / LOCK_NAME
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{work_dir} is in use by {_holder(lock_file)}",
                            hint="wait for that run to end or stop it, or set train.work_dir / --work-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime())}\n".encode())
        yield
    finally:
        if created and sorted(p.name for p in work_dir.iterdir()) == [LOCK_NAME]:
            lock_file.unlink()
            work_dir.rmdir()
        os.close(fd)  # releases the lock
