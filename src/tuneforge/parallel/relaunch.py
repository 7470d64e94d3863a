"""The self-relaunch: `NPROC_PER_NODE=2 [NNODES= NODE_RANK= ADDR= PORT=] tuneforge train ...`
re-runs the same command under `python -m torch.distributed.run` (XTuner style).

Owns reading that request (`spawn_request` -> `SpawnPlan`), the torchrun command line
(`torchrun_command`), running it while forwarding stop signals (`relaunch_with_torchrun`:
SIGINT to torchrun, SIGTERM/SIGUSR1 to the workers so they save before exiting) and the
preemption marker that turns the workers' exit into `PREEMPTED_EXIT`.

torch is not imported here: the relaunching parent never needs it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from tuneforge.errors import UserError
from tuneforge.parallel.launch_env import DEFAULT_PORT, env_int, env_port

DEFAULT_TARGET = ("-m", "tuneforge")


# --------------------------------------------------------------------------- self-relaunch


@dataclass(frozen=True)
class SpawnPlan:
    """What `relaunch_with_torchrun` starts on this node."""

    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    note: str | None = None  # something the CLI should tell the user, e.g. a defaulted port

    def torchrun_args(self) -> list[str]:
        return ["--nproc_per_node", str(self.nproc_per_node), "--nnodes", str(self.nnodes),
                "--node_rank", str(self.node_rank), "--master_addr", self.master_addr,
                "--master_port", str(self.master_port)]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS's pick when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def spawn_request(environ: Mapping[str, str]) -> SpawnPlan | None:
    """The torchrun launch asked for with NPROC_PER_NODE (XTuner style), or None.

    None when NPROC_PER_NODE is unset or when this process already is a launched child
    (RANK or LOCAL_RANK set). NNODES defaults to 1, NODE_RANK to 0, ADDR to 127.0.0.1 and PORT
    to a free local port on one node, or to 29500 on several (each node must agree on it).
    """
    if not (environ.get("NPROC_PER_NODE") or "").strip():
        return None
    if "RANK" in environ or "LOCAL_RANK" in environ:
        return None
    nproc = env_int(environ, "NPROC_PER_NODE", minimum=1)
    nnodes = env_int(environ, "NNODES", minimum=1, default=1)
    node_rank = env_int(environ, "NODE_RANK", minimum=0, default=0)
    if node_rank >= nnodes:
        raise UserError(f"NODE_RANK={node_rank} must be below NNODES={nnodes}")
    addr = (environ.get("ADDR") or "").strip()
    if not addr:
        if node_rank > 0:
            raise UserError(f"NODE_RANK={node_rank} needs ADDR, the address of node 0")
        addr = "127.0.0.1"
    note = None
    if (environ.get("PORT") or "").strip():
        port = env_port(environ, "PORT")
    elif nnodes == 1:
        port = free_port()
    else:
        port = DEFAULT_PORT
        note = f"PORT not set: using {DEFAULT_PORT} on all {nnodes} nodes (set PORT to choose another)"
    return SpawnPlan(nproc, nnodes, node_rank, addr, port, note)


def torchrun_command(plan: SpawnPlan, argv: Sequence[str], target: Sequence[str] = DEFAULT_TARGET) -> list[str]:
    """`python -m torch.distributed.run <plan> <target> <argv>`; target is `-m tuneforge` or a script."""
    return [sys.executable, "-m", "torch.distributed.run", *plan.torchrun_args(), *target, *argv]


PREEMPT_MARKER_ENV = "TUNEFORGE_PREEMPT_MARKER"  # rank 0 writes its exit code here after saving on a stop


def relaunch_with_torchrun(plan: SpawnPlan, argv: Sequence[str], *, target: Sequence[str] = DEFAULT_TARGET,
                           environ: Mapping[str, str] | None = None) -> int:
    """Run `target argv` under torchrun as planned and return its exit status.

    NPROC_PER_NODE is removed from the children's environment so they do not relaunch
    again. torchrun runs in a process group of its own, so a Ctrl-C at the terminal reaches
    only this process, which forwards it: stop requests (SIGTERM, SIGUSR1, the first SIGINT)
    go to the workers themselves, which finish the step, save a checkpoint and exit, however
    long that takes (torchrun, signalled itself, would kill them after 30 s and print its
    tracebacks). After such a stop rank 0 writes its exit code (75, or 130 for Ctrl-C) to the
    marker file of `PREEMPT_MARKER_ENV` and every rank exits 0, so torchrun reports no
    failure; that code is returned here. A second Ctrl-C kills torchrun and the workers at
    once (exit 130).
    """
    from tuneforge.errors import INTERRUPTED_EXIT, PREEMPTED_EXIT

    child_env = dict(os.environ if environ is None else environ)
    child_env.pop("NPROC_PER_NODE", None)
    with tempfile.TemporaryDirectory(prefix="tuneforge-relaunch-") as tmp:
        marker = os.path.join(tmp, "preempted")
        child_env[PREEMPT_MARKER_ENV] = marker
        proc = subprocess.Popen(torchrun_command(plan, argv, target), env=child_env, process_group=0)
        with _forward_signals(proc) as aborted:
            code = proc.wait()
        if aborted:
            print("interrupted: stopped at once, nothing more was saved", file=sys.stderr)
            return INTERRUPTED_EXIT
        if os.path.exists(marker):
            with open(marker) as handle:
                text = handle.read().strip()
            return int(text) if text.isdigit() else PREEMPTED_EXIT
    return code if code >= 0 else 128 - code  # killed by signal N -> 128+N, like a shell


def child_pids(pid: int) -> list[int]:
    """The live child processes of `pid` (torchrun's workers), from /proc; [] elsewhere."""
    children = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ...
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


@contextlib.contextmanager
def _forward_signals(proc: subprocess.Popen) -> Iterator[list]:
    """Forward stop signals to torchrun's workers while the `with` block runs; yields a list
    that is non-empty once a second Ctrl-C has killed torchrun and its workers."""
    aborted: list = []
    if threading.current_thread() is not threading.main_thread():
        yield aborted  # signal handlers can only be installed from the main thread
        return
    interrupts = itertools.count(1)

    def forward(signum, frame):
        if proc.poll() is not None:
            return
        workers = child_pids(proc.pid)  # each in a session of its own (torchrun starts them so)
        if signum == signal.SIGINT and next(interrupts) > 1:  # a second Ctrl-C: abort now
            aborted.append(signum)
            for pid in [proc.pid, *workers]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return
        for pid in workers:  # a stop request: the workers save and exit by themselves
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if not workers:  # not started yet: torchrun stops what it has
            proc.send_signal(signal.SIGTERM)

    stops = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    previous = {sig: signal.signal(sig, forward) for sig in stops}
    try:
        yield aborted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
