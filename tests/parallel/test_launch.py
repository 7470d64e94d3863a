"""Tests for tuneforge.parallel.launch: host lists, launcher detection, SLURM/torchrun
environments, the NPROC_PER_NODE relaunch, and real 2-process gloo runs on the CPU."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tuneforge.errors import UserError
from tuneforge.parallel.launch import (
    LaunchEnv,
    SpawnPlan,
    apply_env,
    detect_launcher,
    env_from_slurm,
    env_from_torchrun,
    expand_nodelist,
    free_port,
    init_distributed,
    launch_env,
    long_barrier,
    parse_tasks_per_node,
    relaunch_with_torchrun,
    spawn_request,
    torchrun_command,
)

# --------------------------------------------------------------------------- expand_nodelist


@pytest.mark.parametrize("spec, hosts", [
    ("node01", ["node01"]),
    ("a,b,c", ["a", "b", "c"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("gpu-[1-2]-x", ["gpu-1-x", "gpu-2-x"]),
    ("n[1-2]-r[3-4]", ["n1-r3", "n1-r4", "n2-r3", "n2-r4"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("node[008-010]", ["node008", "node009", "node010"]),
    ("node[5]", ["node5"]),
    ("x[1-2],y[09-10],z", ["x1", "x2", "y09", "y10", "z"]),
    ("[1-2]host", ["1host", "2host"]),
    (" a , b[1-2] ", ["a", "b1", "b2"]),
    ("", []),
])
def test_expand_nodelist(spec, hosts):
    assert expand_nodelist(spec) == hosts


@pytest.mark.parametrize("spec", ["node[1-3", "node1-3]", "node[[1-2]]", "node[a-b]", "node[3-1]", "node[]", "node[1-]"])
def test_expand_nodelist_rejects_malformed(spec):
    with pytest.raises(UserError, match="malformed host list"):
        expand_nodelist(spec)


@pytest.mark.parametrize("spec, counts", [("4", [4]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]), ("1,3(x2)", [1, 3, 3])])
def test_parse_tasks_per_node(spec, counts):
    assert parse_tasks_per_node(spec) == counts


def test_parse_tasks_per_node_rejects_garbage():
    with pytest.raises(UserError, match="SLURM_TASKS_PER_NODE"):
        parse_tasks_per_node("2(3)")


# --------------------------------------------------------------------------- detect_launcher

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[03-04,09,11]",
         "SLURM_NODEID": "2", "SLURM_TASKS_PER_NODE": "2(x4)"}


def test_detect_launcher():
    assert detect_launcher(None, {}) == "none"
    assert detect_launcher("none", {}) == "none"
    assert detect_launcher(None, TORCHRUN) == "pytorch"
    assert detect_launcher("none", TORCHRUN) == "pytorch"  # never train alone inside a torchrun job
    assert detect_launcher("pytorch", {}) == "pytorch"
    assert detect_launcher(None, SLURM) == "none"  # SLURM only when asked: sbatch sets these for 1-task jobs too
    assert detect_launcher("slurm", SLURM) == "slurm"
    assert detect_launcher("slurm", TORCHRUN) == "slurm"
    partial = {k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}
    assert detect_launcher(None, partial) == "none"


def test_detect_launcher_unknown_suggests():
    with pytest.raises(UserError, match="unknown launcher") as err:
        detect_launcher("slrum", {})
    assert "did you mean 'slurm'" in str(err.value)


# --------------------------------------------------------------------------- env_from_slurm / torchrun


def test_env_from_slurm_multi_node():
    env = env_from_slurm(SLURM)
    assert env == LaunchEnv(rank=5, world_size=8, local_rank=1, local_world_size=2,
                            master_addr="gpu03", master_port=29500, launcher="slurm")


def test_env_from_slurm_sources_and_overrides():
    base = dict(SLURM)
    del base["SLURM_NODELIST"]
    base["SLURM_JOB_NODELIST"] = "cn[7-8]"
    base["MASTER_PORT"] = "31000"
    assert env_from_slurm(base).master_addr == "cn7"
    assert env_from_slurm(base).master_port == 31000
    assert env_from_slurm(base, default_port=1234).master_port == 31000
    assert env_from_slurm({**SLURM, "MASTER_ADDR": "10.1.1.1"}).master_addr == "10.1.1.1"  # mmengine: existing wins
    assert env_from_slurm(SLURM, default_port=1234).master_port == 1234
    # NTASKS_PER_NODE wins over TASKS_PER_NODE; uneven TASKS_PER_NODE picks this node's count.
    assert env_from_slurm({**SLURM, "SLURM_NTASKS_PER_NODE": "4", "SLURM_LOCALID": "3"}).local_world_size == 4
    uneven = {**SLURM, "SLURM_TASKS_PER_NODE": "2(x2),1,2", "SLURM_NTASKS": "7", "SLURM_NODEID": "2", "SLURM_LOCALID": "0"}
    assert env_from_slurm(uneven).local_world_size == 1
    # Nothing per node: NTASKS spread evenly over the hosts.
    even = {k: v for k, v in SLURM.items() if k != "SLURM_TASKS_PER_NODE"}
    assert env_from_slurm(even).local_world_size == 2


def test_env_from_slurm_missing_vars_named():
    with pytest.raises(UserError) as err:
        env_from_slurm({"SLURM_PROCID": "0"})
    message = str(err.value)
    assert message.startswith("launcher 'slurm' needs SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST in the environment")
    assert "srun" in message


@pytest.mark.parametrize("change, match", [
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID must be an integer"),
    ({"SLURM_PROCID": "8"}, "SLURM_PROCID must be at most 7"),
    ({"SLURM_LOCALID": "2"}, "SLURM_LOCALID must be at most 1"),
    ({"SLURM_NTASKS": "0"}, "SLURM_NTASKS must be at least 1"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT must be at most 65535"),
    ({"SLURM_NODEID": "9"}, "SLURM_NODEID=9"),
    ({"SLURM_NODELIST": "gpu[1-"}, "malformed host list"),
])
def test_env_from_slurm_bad_values(change, match):
    with pytest.raises(UserError, match=match):
        env_from_slurm({**SLURM, **change})


def test_env_from_slurm_uneven_without_per_node_count():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_TASKS_PER_NODE"}
    env["SLURM_NTASKS"] = "7"
    with pytest.raises(UserError, match="SLURM_NTASKS_PER_NODE"):
        env_from_slurm(env)


def test_env_from_torchrun_and_apply_env_round_trip():
    env = env_from_torchrun(TORCHRUN)
    assert env == LaunchEnv(1, 4, 1, 2, "10.0.0.1", 29400, "pytorch")
    written: dict[str, str] = {}
    apply_env(env_from_slurm(SLURM), written)
    assert written == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "gpu03", "MASTER_PORT": "29500"}
    assert env_from_torchrun(written) == LaunchEnv(5, 8, 1, 2, "gpu03", 29500, "pytorch")


def test_env_from_torchrun_errors():
    with pytest.raises(UserError, match="MASTER_ADDR, MASTER_PORT") as err:
        env_from_torchrun({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert "NPROC_PER_NODE" in str(err.value)
    with pytest.raises(UserError, match="RANK must be at most 3"):
        env_from_torchrun({**TORCHRUN, "RANK": "4"})


def test_launch_env_dispatches():
    assert launch_env(None, {}) == LaunchEnv.single()
    assert launch_env(None, TORCHRUN).launcher == "pytorch"
    assert launch_env("slurm", SLURM).rank == 5


# --------------------------------------------------------------------------- spawn_request


def test_spawn_request_off_or_inside_child():
    assert spawn_request({}) is None
    assert spawn_request({"NPROC_PER_NODE": ""}) is None
    assert spawn_request({"NPROC_PER_NODE": "2", "RANK": "0"}) is None
    assert spawn_request({"NPROC_PER_NODE": "2", "LOCAL_RANK": "0"}) is None


def test_spawn_request_single_node_free_port():
    plan = spawn_request({"NPROC_PER_NODE": "4"})
    assert (plan.nproc_per_node, plan.nnodes, plan.node_rank, plan.master_addr) == (4, 1, 0, "127.0.0.1")
    assert plan.note is None
    with socket.socket() as sock:  # the port it picked can be bound
        sock.bind(("127.0.0.1", plan.master_port))
    ports = {spawn_request({"NPROC_PER_NODE": "1"}).master_port for _ in range(5)}
    assert 29500 not in ports and len(ports) > 1  # asked the OS, not a constant


def test_spawn_request_explicit_and_multi_node():
    plan = spawn_request({"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "ADDR": "10.0.0.5", "PORT": "30123"})
    assert plan == SpawnPlan(8, 2, 1, "10.0.0.5", 30123, None)
    multi = spawn_request({"NPROC_PER_NODE": "8", "NNODES": "2", "ADDR": "10.0.0.5"})
    assert multi.master_port == 29500
    assert "PORT" in multi.note and "29500" in multi.note
    assert spawn_request({"NPROC_PER_NODE": "8", "NNODES": "2"}).master_addr == "127.0.0.1"  # node 0 may omit ADDR


@pytest.mark.parametrize("environ, match", [
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE must be an integer, got 'two'"),
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be at least 1"),
    ({"NPROC_PER_NODE": "2", "NNODES": "0"}, "NNODES must be at least 1"),
    ({"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2 must be below NNODES=2"),
    ({"NPROC_PER_NODE": "2", "NODE_RANK": "-1"}, "NODE_RANK must be at least 0"),
    ({"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "1"}, "needs ADDR"),
    ({"NPROC_PER_NODE": "2", "PORT": "0"}, "PORT must be at least 1"),
    ({"NPROC_PER_NODE": "2", "PORT": "65536"}, "PORT must be at most 65535"),
])
def test_spawn_request_bad_values(environ, match):
    with pytest.raises(UserError, match=match):
        spawn_request(environ)


def test_torchrun_command():
    cmd = torchrun_command(SpawnPlan(2, 3, 1, "h0", 1234), ["train", "cfg.yaml"])
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "3",
                   "--node_rank", "1", "--master_addr", "h0", "--master_port", "1234",
                   "-m", "tuneforge", "train", "cfg.yaml"]
    assert torchrun_command(SpawnPlan(1, 1, 0, "h", 1), ["a"], target=["s.py"])[-2:] == ["s.py", "a"]


# --------------------------------------------------------------------------- no process group / import cost


def test_module_import_does_not_import_torch():
    code = "import sys, tuneforge.parallel.launch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_init_distributed_without_launcher_creates_no_group():
    import torch.distributed as dist

    ctx = init_distributed(LaunchEnv.single(), timeout_s=5)
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.backend, ctx.initialized) == (0, 1, True, None, False)
    ctx.barrier()
    long_barrier(ctx, poll_s=0.01)
    ctx.close()
    assert not dist.is_initialized()
    with pytest.raises(UserError, match="needs a launcher"):
        init_distributed(LaunchEnv(0, 2, 0, 2, "127.0.0.1", 1, "none"), timeout_s=5)


# --------------------------------------------------------------------------- real processes

WORKER = textwrap.dedent("""
    import os, time
    import torch, torch.distributed as dist
    from tuneforge.parallel.launch import apply_env, env_from_slurm, init_distributed, long_barrier

    env = env_from_slurm(os.environ)
    apply_env(env, os.environ)
    ctx = init_distributed(env, timeout_s=float(os.environ["TEST_TIMEOUT_S"]))
    if ctx.is_main:
        time.sleep(float(os.environ["TEST_RANK0_SLEEP_S"]))  # "building the cache"
    waits = []
    long_barrier(ctx, poll_s=0.1, on_wait=lambda arrived, waited: waits.append(arrived))
    value = torch.tensor([ctx.rank + 1.0])
    dist.all_reduce(value)
    print(f"rank={ctx.rank} backend={ctx.backend} polls={len(waits)} sum={int(value.item())}", flush=True)
    ctx.close()
    print(f"closed={not dist.is_initialized()}", flush=True)
""")


def test_two_slurm_tasks_all_reduce_and_long_barrier(tmp_path):
    """2 simulated srun tasks meet over gloo; rank 0 sleeps past the group's 3 s timeout
    before the long_barrier, which a plain dist.barrier() would not survive."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NODELIST="localhost",
                   MASTER_PORT=str(port), TEST_TIMEOUT_S="3", TEST_RANK0_SLEEP_S="4.5", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=60)[0])
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, out
        assert f"rank={rank} backend=gloo" in out and "sum=3" in out and "closed=True" in out, out
    rank1_polls = int(outputs[1].split("polls=")[1].split()[0])
    assert rank1_polls >= 10  # rank 1 really waited, polling, for several seconds


RANK_SCRIPT = textwrap.dedent("""
    import os, sys, pathlib
    out = pathlib.Path(sys.argv[1])
    rank = os.environ["RANK"]
    (out / f"rank{rank}.txt").write_text(" ".join([os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"],
                                                  str(os.environ.get("NPROC_PER_NODE")), *sys.argv[2:]]))
    sys.exit(int(sys.argv[2]) if rank == "1" else 0)
""")


def test_relaunch_with_torchrun_runs_every_rank(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    plan = spawn_request({"NPROC_PER_NODE": "2"})
    environ = {**os.environ, "NPROC_PER_NODE": "2"}
    assert relaunch_with_torchrun(plan, [str(tmp_path), "0", "--flag"], target=[str(script)], environ=environ) == 0
    assert (tmp_path / "rank0.txt").read_text() == "2 0 None 0 --flag"  # NPROC_PER_NODE removed
    assert (tmp_path / "rank1.txt").read_text() == "2 1 None 0 --flag"

    plan = spawn_request({"NPROC_PER_NODE": "2"})
    assert relaunch_with_torchrun(plan, [str(tmp_path), "3"], target=[str(script)], environ=environ) != 0


SLEEPER = textwrap.dedent("""
    import os, sys, time, pathlib
    pathlib.Path(sys.argv[1], f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
    time.sleep(120)
""")
DRIVER = textwrap.dedent("""
    import sys
    from tuneforge.parallel.launch import SpawnPlan, free_port, relaunch_with_torchrun
    sys.exit(relaunch_with_torchrun(SpawnPlan(2, 1, 0, "127.0.0.1", free_port()), [sys.argv[1]], target=[sys.argv[2]]))
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_relaunch_forwards_sigterm(tmp_path):
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    (tmp_path / "driver.py").write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path), str(tmp_path / "sleeper.py")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pid_files = [tmp_path / "pid0", tmp_path / "pid1"]
    try:
        deadline = time.monotonic() + 60
        while not all(p.exists() and p.read_text() for p in pid_files):
            assert time.monotonic() < deadline and driver.poll() is None, "workers never started"
            time.sleep(0.1)
        workers = [int(p.read_text()) for p in pid_files]
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=30) != 0
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), "workers outlived the relaunch"
    finally:  # on failure, leave nothing behind: torchrun starts each worker in a session of its own
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        for path in pid_files:
            with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                os.kill(int(path.read_text()), signal.SIGKILL)
