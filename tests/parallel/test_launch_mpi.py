"""`--launcher mpi`: Open MPI's variables read into a `LaunchEnv` (unit tests), and a real
`mpirun -np 2 tuneforge train ... --launcher mpi` on the CPU that must reproduce one process.

The real run needs Open MPI's `mpirun` on PATH (scripts/setup.sh installs `openmpi-bin`)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from helpers import alpaca_records, build_tokenizer, make_tiny_model, write_jsonl
from jobs import assert_matches_single, child_env, metric_rows, one_thread, run_config
from tuneforge.cli import main
from tuneforge.errors import UserError
from tuneforge.parallel.launch import (
    LaunchEnv,
    detect_launcher,
    env_from_mpi,
    free_port,
    is_local_address,
    launch_env,
    mpi_master_addr,
)

# rank 9 of 16, 8 per node: the second process of node2 in `mpirun -np 16 -H node1:8,node2:8`
MPI = {"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
       "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "MASTER_ADDR": "node1"}
HNP_URI = "1262419968.0;tcp://10.0.0.1,172.17.0.1:53195;tcp6://[fd00::2]:39375"  # as Open MPI 4.1 sets it


def test_detect_and_dispatch():
    assert detect_launcher(None, MPI) == "none"  # only when asked, like SLURM
    assert detect_launcher("mpi", MPI) == "mpi"
    assert launch_env("mpi", MPI) == LaunchEnv(9, 16, 1, 8, "node1", 29500, "mpi")
    with pytest.raises(UserError, match="did you mean 'mpi'"):
        detect_launcher("mpu", {})


def test_port_and_address_sources():
    assert env_from_mpi({**MPI, "MASTER_PORT": "31000"}).master_port == 31000
    assert env_from_mpi(MPI, default_port=1234).master_port == 1234
    one_node = {**{k: v for k, v in MPI.items() if k != "MASTER_ADDR"}, "OMPI_COMM_WORLD_LOCAL_SIZE": "16"}
    assert env_from_mpi(one_node).master_addr == "127.0.0.1"  # every process here: localhost
    assert env_from_mpi({**one_node, "MASTER_ADDR": "10.9.9.9"}).master_addr == "10.9.9.9"  # the environment wins
    # several nodes, no MASTER_ADDR: mpirun's host, from its URI; guessed, so rank 0 checks it
    assert mpi_master_addr({"OMPI_MCA_orte_hnp_uri": HNP_URI}, 16, 8) == ("10.0.0.1", True)
    assert mpi_master_addr({"OMPI_MCA_orte_hnp_uri": HNP_URI, "MASTER_ADDR": "node1"}, 16, 8) == ("node1", False)
    no_addr = {k: v for k, v in MPI.items() if k != "MASTER_ADDR"}
    assert env_from_mpi({**no_addr, "OMPI_MCA_orte_hnp_uri": HNP_URI}).master_addr == "10.0.0.1"  # rank 9: no check


def test_rank0_refuses_a_guessed_address_that_is_not_its_own():
    rank0 = {k: v for k, v in MPI.items() if k != "MASTER_ADDR"}
    rank0.update(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_LOCAL_RANK="0", OMPI_MCA_orte_hnp_uri=HNP_URI)
    checked = []
    env = env_from_mpi(rank0, is_local=lambda addr: checked.append(addr) or True)
    assert (env.rank, env.master_addr, checked) == (0, "10.0.0.1", ["10.0.0.1"])
    with pytest.raises(UserError, match="rank 0 does not run on 10.0.0.1") as err:
        env_from_mpi(rank0, is_local=lambda addr: False)
    assert "-x MASTER_ADDR=" in str(err.value)
    with pytest.raises(UserError, match="on several nodes .* needs MASTER_ADDR"):
        env_from_mpi({k: v for k, v in rank0.items() if k != "OMPI_MCA_orte_hnp_uri"})


def test_is_local_address():
    assert is_local_address("127.0.0.1")
    assert not is_local_address("203.0.113.7")  # TEST-NET-3, documentation only: not an address of this host
    assert not is_local_address("no-such-host.invalid")


def test_missing_variables_are_named():
    with pytest.raises(UserError) as err:
        env_from_mpi({"OMPI_COMM_WORLD_RANK": "0"})
    message = str(err.value)
    assert message.startswith("launcher 'mpi' needs OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK, "
                              "OMPI_COMM_WORLD_LOCAL_SIZE in the environment")
    assert "mpirun" in message


@pytest.mark.parametrize("change, match", [
    ({"OMPI_COMM_WORLD_RANK": "x"}, "OMPI_COMM_WORLD_RANK must be an integer"),
    ({"OMPI_COMM_WORLD_RANK": "16"}, "OMPI_COMM_WORLD_RANK must be at most 15"),
    ({"OMPI_COMM_WORLD_SIZE": "0"}, "OMPI_COMM_WORLD_SIZE must be at least 1"),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "8"}, "OMPI_COMM_WORLD_LOCAL_RANK must be at most 7"),
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "17"}, "OMPI_COMM_WORLD_LOCAL_SIZE must be at most 16"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT must be at most 65535"),
])
def test_bad_values(change, match):
    with pytest.raises(UserError, match=match):
        env_from_mpi({**MPI, **change})


# --------------------------------------------------------------------------- a real mpirun


def test_mpirun_two_ranks_match_one_process(tmp_path):
    """`mpirun --allow-run-as-root --oversubscribe -np 2 tuneforge train CFG --launcher mpi`
    (DDP over gloo, one node, MASTER_ADDR/MASTER_PORT defaulted or from the environment)
    reproduces the single process with the same global batch."""
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: install Open MPI (scripts/setup.sh installs openmpi-bin)"
    model = make_tiny_model(tmp_path / "model", build_tokenizer(), tie=True)
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_records(64))
    with one_thread():
        assert main(["train", str(run_config(tmp_path, "single", model, data, micro=4))]) == 0
    config = run_config(tmp_path, "mpi", model, data, {"parallel": {"strategy": "ddp"}})
    env = {k: v for k, v in child_env(MASTER_PORT=str(free_port())).items() if not k.startswith(("OMPI_", "PMIX_"))}
    proc = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2",
                           sys.executable, "-m", "tuneforge", "train", str(config), "--launcher", "mpi"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ddp on 2 ranks, gloo on cpu" in proc.stderr
    assert_matches_single(tmp_path / "mpi", tmp_path / "single")
    assert all(len(row["rank_tokens"]) == 2 for row in metric_rows(tmp_path / "mpi"))

