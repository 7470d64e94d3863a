"""Process launching: where this process sits in the job, and how the job's processes start.

Owns, following XTuner/mmengine conventions:

* reading the launcher's environment (torchrun or SLURM's srun) into a `LaunchEnv`,
  including SLURM's compressed host lists (`expand_nodelist`);
* the self-relaunch `NPROC_PER_NODE=2 [NNODES= NODE_RANK= ADDR= PORT=] tuneforge train ...`,
  which re-runs the command under `python -m torch.distributed.run` (`spawn_request`,
  `relaunch_with_torchrun`);
* creating the process group, returned as a `DistContext` object: there is no module-level
  process-group state here, and `long_barrier` for waits that may last far longer than the
  collective timeout (rank 0 building a data cache while the others wait).

torch is imported inside functions only: the CLI imports this module and must start fast.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tuneforge.errors import UserError, did_you_mean

LAUNCHERS = ("none", "pytorch", "slurm")
DEFAULT_PORT = 29500
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
DEFAULT_TARGET = ("-m", "tuneforge")


# --------------------------------------------------------------------------- where am I


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, whichever launcher started it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "none" | "pytorch" | "slurm"

    @classmethod
    def single(cls) -> LaunchEnv:
        """One process, no launcher."""
        return cls(0, 1, 0, 1, "127.0.0.1", DEFAULT_PORT, "none")


def _int_var(environ: Mapping[str, str], name: str, *, minimum: int | None = None,
             maximum: int | None = None, default: int | None = None) -> int:
    raw = (environ.get(name) or "").strip()
    if not raw:
        if default is None:
            raise UserError(f"environment variable {name} is not set")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise UserError(f"environment variable {name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise UserError(f"environment variable {name} must be at most {maximum}, got {value}")
    return value


def _port_var(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    return _int_var(environ, name, minimum=1, maximum=65535, default=default)


def detect_launcher(requested: str | None, environ: Mapping[str, str]) -> str:
    """The launcher in use: "slurm" only when requested; "pytorch" when requested or when the
    torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) are all set; else "none".

    A requested "none" inside a torchrun job still gives "pytorch": ignoring the launcher
    would make every process train alone on the whole data set.
    """
    if requested is not None and requested not in LAUNCHERS:
        raise UserError(f"unknown launcher {requested!r}; choose one of {', '.join(LAUNCHERS)}",
                        hint=did_you_mean(requested, LAUNCHERS))
    if requested in ("slurm", "pytorch"):
        return requested
    if all(environ.get(name) for name in TORCHRUN_VARS):
        return "pytorch"
    return "none"


def env_from_torchrun(environ: Mapping[str, str]) -> LaunchEnv:
    """The `LaunchEnv` of a process started by torchrun (`torch.distributed.run`)."""
    missing = [name for name in (*TORCHRUN_VARS, "MASTER_PORT") if not environ.get(name)]
    if missing:
        raise UserError(f"launcher 'pytorch' needs {', '.join(missing)} in the environment",
                        hint="start with torchrun, or set NPROC_PER_NODE to let tuneforge start it")
    world_size = _int_var(environ, "WORLD_SIZE", minimum=1)
    rank = _int_var(environ, "RANK", minimum=0, maximum=world_size - 1)
    local_world = _int_var(environ, "LOCAL_WORLD_SIZE", minimum=1, default=world_size)
    local_rank = _int_var(environ, "LOCAL_RANK", minimum=0, maximum=local_world - 1)
    return LaunchEnv(rank, world_size, local_rank, local_world, environ["MASTER_ADDR"].strip(),
                     _port_var(environ, "MASTER_PORT"), "pytorch")


def env_from_slurm(environ: Mapping[str, str], default_port: int = DEFAULT_PORT) -> LaunchEnv:
    """The `LaunchEnv` of a task started by `srun`.

    Rank, world size and local rank come from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID;
    the tasks on this node from SLURM_NTASKS_PER_NODE, else SLURM_TASKS_PER_NODE (`2(x3),1`
    at SLURM_NODEID), else NTASKS spread evenly over the nodes. As in mmengine, an existing
    MASTER_ADDR wins over the first host of SLURM_NODELIST (or SLURM_JOB_NODELIST), and the
    port is MASTER_PORT or `default_port`.
    """
    nodelist = environ.get("SLURM_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    missing = [name for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID") if not environ.get(name)]
    if not nodelist:
        missing.append("SLURM_NODELIST")
    if missing:
        raise UserError(f"launcher 'slurm' needs {', '.join(missing)} in the environment",
                        hint="start each task with srun, e.g. srun --ntasks-per-node=8 tuneforge train ... --launcher slurm")
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise UserError(f"SLURM_NODELIST {nodelist!r} names no host")
    world_size = _int_var(environ, "SLURM_NTASKS", minimum=1)
    rank = _int_var(environ, "SLURM_PROCID", minimum=0, maximum=world_size - 1)
    local_world = _slurm_local_world(environ, world_size, len(hosts))
    local_rank = _int_var(environ, "SLURM_LOCALID", minimum=0, maximum=local_world - 1)
    master_addr = (environ.get("MASTER_ADDR") or "").strip() or hosts[0]
    return LaunchEnv(rank, world_size, local_rank, local_world, master_addr,
                     _port_var(environ, "MASTER_PORT", default=default_port), "slurm")


def _slurm_local_world(environ: Mapping[str, str], world_size: int, n_hosts: int) -> int:
    if environ.get("SLURM_NTASKS_PER_NODE"):
        return _int_var(environ, "SLURM_NTASKS_PER_NODE", minimum=1)
    spec = environ.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = parse_tasks_per_node(spec)
        node = _int_var(environ, "SLURM_NODEID", minimum=0, default=0)
        if node >= len(counts):
            raise UserError(f"SLURM_NODEID={node} but SLURM_TASKS_PER_NODE={spec!r} lists {len(counts)} nodes")
        return counts[node]
    if world_size % n_hosts:
        raise UserError(f"cannot tell how many of the {world_size} SLURM tasks run on this node",
                        hint="set SLURM_NTASKS_PER_NODE (srun --ntasks-per-node=N)")
    return world_size // n_hosts


def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE (`2(x3),1`) as one count per node: [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise UserError(f"cannot read SLURM_TASKS_PER_NODE {spec!r}", hint="expected a form like '4' or '2(x3),1'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def launch_env(requested: str | None, environ: Mapping[str, str]) -> LaunchEnv:
    """`detect_launcher` followed by the matching `env_from_*`."""
    launcher = detect_launcher(requested, environ)
    if launcher == "slurm":
        return env_from_slurm(environ)
    if launcher == "pytorch":
        return env_from_torchrun(environ)
    return LaunchEnv.single()


def apply_env(env: LaunchEnv, environ: MutableMapping[str, str]) -> None:
    """Write the variables torch.distributed's env:// rendezvous (and torchrun-aware code) reads."""
    environ.update({
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })


# --------------------------------------------------------------------------- SLURM host lists


def expand_nodelist(spec: str) -> list[str]:
    """Expand a SLURM host list: `node[01-03,07]` -> node01, node02, node03, node07.

    Handles comma-separated items (`a1,b[2-3]`), brackets anywhere in a name (`gpu-[1-2]-x`),
    several bracket groups (`n[1-2]-r[3-4]`, the last one varying fastest) and zero padding
    (the width of a range's first number, as SLURM does).
    """
    hosts: list[str] = []
    for item in _split_top_level(spec):
        pieces = re.split(r"(\[[^\[\]]*\])", item)
        choices = []
        for piece in pieces:
            if piece.startswith("["):
                choices.append(_expand_group(piece[1:-1], spec))
            elif "[" in piece or "]" in piece:
                raise UserError(f"malformed host list {spec!r}: unbalanced brackets")
            else:
                choices.append([piece])
        hosts += ["".join(parts) for parts in itertools.product(*choices)]
    return hosts


def _split_top_level(spec: str) -> list[str]:
    items, depth, current = [], 0, []
    for ch in spec:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise UserError(f"malformed host list {spec!r}: unbalanced or nested brackets")
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise UserError(f"malformed host list {spec!r}: unbalanced brackets")
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _expand_group(body: str, spec: str) -> list[str]:
    values: list[str] = []
    for token in body.split(","):
        token = token.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", token)
        if not m:
            raise UserError(f"malformed host list {spec!r}: bad range {token!r} in brackets")
        start, end = m.group(1), m.group(2)
        if end is None:
            values.append(start)
            continue
        if int(end) < int(start):
            raise UserError(f"malformed host list {spec!r}: range {token!r} runs backwards")
        values += [str(i).zfill(len(start)) for i in range(int(start), int(end) + 1)]
    return values


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
    nproc = _int_var(environ, "NPROC_PER_NODE", minimum=1)
    nnodes = _int_var(environ, "NNODES", minimum=1, default=1)
    node_rank = _int_var(environ, "NODE_RANK", minimum=0, default=0)
    if node_rank >= nnodes:
        raise UserError(f"NODE_RANK={node_rank} must be below NNODES={nnodes}")
    addr = (environ.get("ADDR") or "").strip()
    if not addr:
        if node_rank > 0:
            raise UserError(f"NODE_RANK={node_rank} needs ADDR, the address of node 0")
        addr = "127.0.0.1"
    note = None
    if (environ.get("PORT") or "").strip():
        port = _port_var(environ, "PORT")
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


# --------------------------------------------------------------------------- process group


@dataclass(eq=False)
class DistContext:
    """A handle on this process's process group (or on none, for one process without a launcher)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: Any  # torch.device
    backend: str | None  # "nccl" | "gloo" | None when no group was created
    store: Any = field(default=None, repr=False)  # the rendezvous store, prefixed per job attempt
    closed: bool = field(default=False, repr=False)
    long_barriers: int = field(default=0, repr=False)
    heartbeat: Any = field(default=None, repr=False)  # a heartbeat.Heartbeat, to name a rank that stops
    timeout_s: float = 1800.0  # the process-group timeout

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.backend is not None and not self.closed

    def barrier(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Destroy the process group (idempotent)."""
        if self.initialized:
            import torch.distributed as dist

            if self.heartbeat is not None:
                self.heartbeat.stop()
            if dist.is_initialized():
                dist.destroy_process_group()
        self.closed = True

    def lost_peer_error(self, exc: BaseException):
        """A `heartbeat.LostPeerError` naming the ranks that stopped, when `exc` is a failed
        collective or store call in a job; None otherwise (a bug to show as is)."""
        from tuneforge.parallel.heartbeat import looks_like_lost_peer, lost_peer_error

        if self.world_size == 1 or self.backend is None or not looks_like_lost_peer(exc):
            return None
        return lost_peer_error(exc, self.heartbeat, self.rank, self.timeout_s)

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def init_distributed(env: LaunchEnv, timeout_s: float = 1800.0) -> DistContext:
    """Create the process group for `env` and return its `DistContext`.

    Backend nccl when CUDA is available (device cuda:local_rank), else gloo on the CPU. The
    rendezvous is env://: `env` is first written to os.environ with `apply_env`, so `env` is
    the single source of truth. Launcher "none" gets a context that never creates a group.
    """
    import torch

    if env.launcher == "none":
        if env.world_size != 1:
            raise UserError(f"world size {env.world_size} needs a launcher", hint="use --launcher pytorch or slurm")
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return DistContext(0, 1, 0, 1, device, None)

    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed support")
    if dist.is_initialized():
        raise RuntimeError("a process group already exists; close() the previous DistContext first")
    if torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if env.local_rank >= visible:
            raise UserError(f"local rank {env.local_rank} has no GPU: only {visible} visible",
                            hint="start at most one process per GPU on each node")
        backend, device = "nccl", torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")

    apply_env(env, os.environ)
    timeout = timedelta(seconds=timeout_s)
    try:
        # What init_process_group(init_method="env://") does inside, kept here so that
        # long_barrier can use the store without torch's private _get_default_store().
        store, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size, timeout=timeout))
        store.set_timeout(timeout)
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=env.rank,
                                world_size=env.world_size, timeout=timeout,
                                device_id=device if backend == "nccl" else None)
    except dist.DistError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"rank {env.rank} could not join the process group at {env.master_addr}:{env.master_port}: {first_line}",
                        hint="check MASTER_ADDR/MASTER_PORT, that every rank started, and that the port is not in use") from exc
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun restarts reuse the agent's store
    from tuneforge.parallel.heartbeat import Heartbeat

    heartbeat = Heartbeat(env.master_addr, env.master_port, env.rank, env.world_size,
                          prefix=f"tuneforge/attempt{attempt}/").start()
    return DistContext(env.rank, env.world_size, env.local_rank, env.local_world_size, device, backend,
                       store=dist.PrefixStore(f"tuneforge/attempt{attempt}", store), heartbeat=heartbeat,
                       timeout_s=timeout_s)


def long_barrier(ctx: DistContext, poll_s: float = 5.0, *,
                 on_wait: Callable[[int, float], None] | None = None) -> None:
    """A barrier that never times out, for waits of unbounded length (rank 0 builds a cache).

    Each rank adds 1 to a counter key in the rendezvous store, then polls it every `poll_s`
    seconds until all ranks arrived; `on_wait(arrived, waited_s)` is called after each poll
    (for progress logs). Why not `dist.barrier()` on a gloo side group with a 1-day timeout:
    that is still a timeout; `new_group` is itself a collective that every rank must reach
    before the slow work starts; a blocking C++ barrier does not run Python signal handlers,
    so Ctrl-C is ignored until it returns; and under NCCL a long-pending collective trips the
    watchdog. Each store poll is a tiny request answered at once, so no collective timeout
    applies, Ctrl-C works between polls, and a dead store host makes the next poll raise
    instead of hanging. The cost is up to `poll_s` of extra latency.
    """
    if ctx.world_size == 1 or ctx.backend is None:
        return
    if ctx.closed:
        raise RuntimeError("long_barrier on a closed DistContext")
    ctx.long_barriers += 1
    key = f"long_barrier/{ctx.long_barriers}"
    arrived = ctx.store.add(key, 1)
    start = time.monotonic()
    while arrived < ctx.world_size:
        time.sleep(poll_s)
        arrived = ctx.store.add(key, 0)
        if on_wait is not None:
            on_wait(arrived, time.monotonic() - start)
