"""Where this process sits in the job: the launcher's environment read into a `LaunchEnv`.

Owns, following XTuner/mmengine conventions: detecting the launcher (`detect_launcher`),
reading torchrun's, SLURM's (srun) or Open MPI's (mpirun) variables (`env_from_torchrun`,
`env_from_slurm`, `env_from_mpi`, including SLURM's compressed host lists, `expand_nodelist`), the strict integer/port
parsing of those variables (`env_int`, `env_port`) with one-line errors, and writing the
result back as the variables torch's env:// rendezvous reads (`apply_env`).

Pure standard library: the CLI imports this module and must start fast.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

from tuneforge.errors import UserError, did_you_mean

LAUNCHERS = ("none", "pytorch", "slurm", "mpi")
DEFAULT_PORT = 29500
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
OMPI_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")


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
    launcher: str  # "none" | "pytorch" | "slurm" | "mpi"

    @classmethod
    def single(cls) -> LaunchEnv:
        """One process, no launcher."""
        return cls(0, 1, 0, 1, "127.0.0.1", DEFAULT_PORT, "none")


def env_int(environ: Mapping[str, str], name: str, *, minimum: int | None = None,
             maximum: int | None = None, default: int | None = None) -> int:
    """The integer variable `name`, within [minimum, maximum]; `default` when unset or empty.

    Raises `UserError` naming the variable when it is missing (no default), not an integer,
    or out of range."""
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


def env_port(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    """The TCP port in variable `name` (1-65535)."""
    return env_int(environ, name, minimum=1, maximum=65535, default=default)


def require_vars(environ: Mapping[str, str], launcher: str, names: tuple[str, ...], hint: str) -> None:
    """Raise one `UserError` naming every variable of `names` that `launcher` needs and lacks."""
    missing = [name for name in names if not environ.get(name)]
    if missing:
        raise UserError(f"launcher {launcher!r} needs {', '.join(missing)} in the environment", hint=hint)


def read_ranks(environ: Mapping[str, str], rank: str, world: str, local_rank: str, local_world: str,
               local_world_default: bool = False) -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from the variables so named, checked:
    world >= 1, 0 <= rank < world, 1 <= local world <= world, 0 <= local rank < local world.
    With `local_world_default` an unset local world size means the whole world (one node)."""
    world_size = env_int(environ, world, minimum=1)
    rank_value = env_int(environ, rank, minimum=0, maximum=world_size - 1)
    local_size = env_int(environ, local_world, minimum=1, maximum=world_size,
                         default=world_size if local_world_default else None)
    return rank_value, world_size, env_int(environ, local_rank, minimum=0, maximum=local_size - 1), local_size


def detect_launcher(requested: str | None, environ: Mapping[str, str]) -> str:
    """The launcher in use: "slurm" or "mpi" only when requested; "pytorch" when requested or when the
    torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) are all set; else "none".

    A requested "none" inside a torchrun job still gives "pytorch": ignoring the launcher
    would make every process train alone on the whole data set.
    """
    if requested is not None and requested not in LAUNCHERS:
        raise UserError(f"unknown launcher {requested!r}; choose one of {', '.join(LAUNCHERS)}",
                        hint=did_you_mean(requested, LAUNCHERS))
    if requested in ("slurm", "mpi", "pytorch"):
        return requested
    if all(environ.get(name) for name in TORCHRUN_VARS):
        return "pytorch"
    return "none"


def env_from_torchrun(environ: Mapping[str, str]) -> LaunchEnv:
    """The `LaunchEnv` of a process started by torchrun (`torch.distributed.run`)."""
    require_vars(environ, "pytorch", (*TORCHRUN_VARS, "MASTER_PORT"),
                 hint="start with torchrun, or set NPROC_PER_NODE to let tuneforge start it")
    rank, world_size, local_rank, local_world = read_ranks(
        environ, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", local_world_default=True)
    return LaunchEnv(rank, world_size, local_rank, local_world, environ["MASTER_ADDR"].strip(),
                     env_port(environ, "MASTER_PORT"), "pytorch")


def env_from_slurm(environ: Mapping[str, str], default_port: int = DEFAULT_PORT) -> LaunchEnv:
    """The `LaunchEnv` of a task started by `srun`.

    Rank, world size and local rank come from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID;
    the tasks on this node from SLURM_NTASKS_PER_NODE, else SLURM_TASKS_PER_NODE (`2(x3),1`
    at SLURM_NODEID), else NTASKS spread evenly over the nodes. As in mmengine, an existing
    MASTER_ADDR wins over the first host of SLURM_NODELIST (or SLURM_JOB_NODELIST), and the
    port is MASTER_PORT or `default_port`.
    """
    nodelist = environ.get("SLURM_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    require_vars({**environ, "SLURM_NODELIST": nodelist or ""}, "slurm",
                 ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODELIST"),
                 hint="start each task with srun, e.g. srun --ntasks-per-node=8 tuneforge train ... --launcher slurm")
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise UserError(f"SLURM_NODELIST {nodelist!r} names no host")
    world_size = env_int(environ, "SLURM_NTASKS", minimum=1)
    rank = env_int(environ, "SLURM_PROCID", minimum=0, maximum=world_size - 1)
    local_world = _slurm_local_world(environ, world_size, len(hosts))
    local_rank = env_int(environ, "SLURM_LOCALID", minimum=0, maximum=local_world - 1)
    master_addr = (environ.get("MASTER_ADDR") or "").strip() or hosts[0]
    return LaunchEnv(rank, world_size, local_rank, local_world, master_addr,
                     env_port(environ, "MASTER_PORT", default=default_port), "slurm")


def _slurm_local_world(environ: Mapping[str, str], world_size: int, n_hosts: int) -> int:
    if environ.get("SLURM_NTASKS_PER_NODE"):
        return env_int(environ, "SLURM_NTASKS_PER_NODE", minimum=1)
    spec = environ.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = parse_tasks_per_node(spec)
        node = env_int(environ, "SLURM_NODEID", minimum=0, default=0)
        if node >= len(counts):
            raise UserError(f"SLURM_NODEID={node} but SLURM_TASKS_PER_NODE={spec!r} lists {len(counts)} nodes")
        return counts[node]
    if world_size % n_hosts:
        raise UserError(f"cannot tell how many of the {world_size} SLURM tasks run on this node",
                        hint="set SLURM_NTASKS_PER_NODE (srun --ntasks-per-node=N)")
    return world_size // n_hosts


def env_from_mpi(environ: Mapping[str, str], default_port: int = DEFAULT_PORT,
                 is_local: Callable[[str], bool] | None = None) -> LaunchEnv:
    """The `LaunchEnv` of a process started by Open MPI's `mpirun`.

    Rank, world size, local rank and the processes on this node come from
    OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK and _LOCAL_SIZE, checked like SLURM's. The port
    is MASTER_PORT or `default_port`. The address (`mpi_master_addr`): MASTER_ADDR when set
    (`mpirun -x MASTER_ADDR=...`); else 127.0.0.1 when every process runs on this node; else
    the host mpirun runs on, which rank 0 checks is its own (`is_local`, default
    `is_local_address`) so that a wrong guess is one clear error instead of a rendezvous
    that hangs until the timeout.
    """
    require_vars(environ, "mpi", OMPI_VARS,
                 hint="start each process with Open MPI's mpirun, e.g. mpirun -np 8 tuneforge train ... --launcher mpi")
    rank, world_size, local_rank, local_world = read_ranks(environ, *OMPI_VARS)
    master_addr, guessed = mpi_master_addr(environ, world_size, local_world)
    if guessed and rank == 0 and not (is_local or is_local_address)(master_addr):
        raise UserError(f"rank 0 does not run on {master_addr}, the host mpirun runs on, so the other ranks cannot find it",
                        hint="pass the address of rank 0's host: mpirun -x MASTER_ADDR=<first host> ...")
    return LaunchEnv(rank, world_size, local_rank, local_world, master_addr,
                     env_port(environ, "MASTER_PORT", default=default_port), "mpi")


def mpi_master_addr(environ: Mapping[str, str], world_size: int, local_world: int) -> tuple[str, bool]:
    """Rank 0's address under mpirun, and whether it was guessed (from mpirun's own host).

    MASTER_ADDR wins; one node (all `world_size` processes local) is 127.0.0.1; on several
    nodes, the first TCP address of the mpirun process in OMPI_MCA_orte_hnp_uri (Open MPI 4:
    `JOBID.0;tcp://10.0.0.1,172.17.0.1:PORT;tcp6://...`), which is rank 0's host when mpirun
    is started on the first host of its host list, as usual. Open MPI 5 has no such variable:
    there MASTER_ADDR is required on several nodes.
    """
    addr = (environ.get("MASTER_ADDR") or "").strip()
    if addr:
        return addr, False
    if local_world == world_size:
        return "127.0.0.1", False
    m = re.search(r"tcp://([^,:;/\[\]]+)", environ.get("OMPI_MCA_orte_hnp_uri") or "")
    if not m:
        raise UserError(f"launcher 'mpi' on several nodes ({world_size} processes, {local_world} on this one) needs MASTER_ADDR",
                        hint="pass the address of rank 0's host: mpirun -x MASTER_ADDR=<first host> -x MASTER_PORT=29500 ...")
    return m.group(1), True


def is_local_address(addr: str) -> bool:
    """True when `addr` is one of this host's addresses (a socket can bind to it)."""
    try:
        infos = socket.getaddrinfo(addr, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((sockaddr[0], 0))
            return True
    return False


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
    if launcher == "mpi":
        return env_from_mpi(environ)
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
