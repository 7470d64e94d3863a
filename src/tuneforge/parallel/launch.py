"""Process launching, one import for callers: where this process sits in the job, how the
job's processes start, and its process group.

The work is split by concern (each module says what it owns):

* `tuneforge.parallel.launch_env`: launcher detection and the launchers' environments
  (torchrun, SLURM, Open MPI) read into a `LaunchEnv`;
* `tuneforge.parallel.relaunch`: the `NPROC_PER_NODE=N tuneforge train ...` self-relaunch under
  torchrun, with stop-signal forwarding;
* `tuneforge.parallel.process_group`: `init_distributed`, `DistContext` and `long_barrier`.

This module only re-exports their public names, so that `from tuneforge.parallel.launch import
...` keeps working; new code inside tuneforge imports from the module that owns the name.
None of them imports torch at module level: the CLI imports this and must start fast.
"""

from __future__ import annotations

from tuneforge.parallel.launch_env import (
    DEFAULT_PORT,
    LAUNCHERS,
    OMPI_VARS,
    TORCHRUN_VARS,
    LaunchEnv,
    apply_env,
    detect_launcher,
    env_from_mpi,
    env_from_slurm,
    env_from_torchrun,
    env_int,
    env_port,
    expand_nodelist,
    is_local_address,
    launch_env,
    mpi_master_addr,
    parse_tasks_per_node,
)
from tuneforge.parallel.process_group import DistContext, init_distributed, long_barrier
from tuneforge.parallel.relaunch import (
    DEFAULT_TARGET,
    PREEMPT_MARKER_ENV,
    SpawnPlan,
    child_pids,
    free_port,
    relaunch_with_torchrun,
    spawn_request,
    torchrun_command,
)

__all__ = [
    "DEFAULT_PORT", "DEFAULT_TARGET", "LAUNCHERS", "OMPI_VARS", "PREEMPT_MARKER_ENV", "TORCHRUN_VARS",
    "DistContext", "LaunchEnv", "SpawnPlan", "apply_env", "child_pids", "detect_launcher", "env_from_mpi",
    "env_from_slurm", "env_from_torchrun", "env_int", "env_port", "expand_nodelist", "free_port",
    "init_distributed", "is_local_address", "launch_env", "long_barrier", "mpi_master_addr", "parse_tasks_per_node", "relaunch_with_torchrun", "spawn_request",
    "torchrun_command",
]
