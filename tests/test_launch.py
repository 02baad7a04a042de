"""Launch anywhere: torchrun (one host, two "hosts" on loopback), mpirun (mpi4py), Slurm
(variables set by hand), and the CPU simulation; and what the runtime listens on.

The real launches run `tests/launch_check.py`, in which every rank checks the layer
against the float64 reference and exits non-zero on a mismatch.
"""
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from ep.dist import detect_launch, first_host
from ep.launch import free_loopback_port
from tests.launch_check import is_loopback, listening_sockets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "tests", "launch_check.py")


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "OMPI_", "PMI", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)
    return env


def _expect_ok(procs_out, world):
    text = "\n".join(procs_out)
    ranks = sorted(int(r) for r in re.findall(r"launch_check OK rank (\d+)/", text))  # lines may interleave
    assert ranks == list(range(world)), f"ranks that passed: {ranks}\n{text[-4000:]}"
    return text


def _run(cmd, world, timeout=300, **env):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return _expect_ok([p.stdout], world)


def _need(tool):
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed; scripts/setup.sh installs it")
        pytest.skip(f"{tool} is not installed")


# ---- reading the environment ----------------------------------------------------------
def test_torchrun_environment():
    info = detect_launch({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"})
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.single_host) == ("torchrun", 2, 4, 2, True)


def test_inconsistent_environment_is_named():
    with pytest.raises(RuntimeError, match=r"\['RANK', 'MASTER_ADDR', 'MASTER_PORT'\] not set"):
        detect_launch({"WORLD_SIZE": "4"})
    with pytest.raises(RuntimeError, match="rank 4 is not in"):
        detect_launch({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(RuntimeError, match="SLURM_NTASKS"):
        detect_launch({"SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1"})


def test_single_process():
    assert detect_launch({}).launcher == "single"


@pytest.mark.parametrize("nodelist, host", [("n1", "n1"), ("gpu[03-05,9],login1", "gpu03"),
                                            ("a-b[1,4]", "a-b1"), ("x01,x02", "x01")])
def test_slurm_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_environment():
    one = detect_launch({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
                         "SLURM_JOB_NODELIST": "node7", "SLURM_NNODES": "1", "SLURM_JOB_ID": "123"})
    assert (one.launcher, one.rank, one.world_size, one.local_rank) == ("slurm", 1, 2, 1)
    assert one.master_addr == "127.0.0.1" and one.master_port == 20123 and one.single_host
    many = detect_launch({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                          "SLURM_JOB_NODELIST": "gpu[03-06]", "SLURM_NNODES": "4", "SLURM_JOB_ID": "45678"})
    assert many.master_addr == "gpu03" and many.master_port == 25678 and not many.single_host


def test_socket_check_sees_a_wildcard_listener():
    """The listening-socket check used below can fail: a 0.0.0.0 listener is caught."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("0.0.0.0", 0))
    s.listen(1)
    try:
        mine = [x for x in listening_sockets([os.getpid()]) if x[1] == s.getsockname()[1]]
        assert mine and not is_loopback(mine[0][0])
    finally:
        s.close()


# ---- real launches -----------------------------------------------------------------------
def test_cpu_simulation_launcher_listens_on_loopback_only():
    _run([sys.executable, "-m", "ep.launch", "-n", "4", CHECK, "--sockets"], 4)


def test_torchrun_standalone():
    _need("torchrun")
    out = _run(["torchrun", "--standalone", "--nproc-per-node", "4", CHECK, "--sockets"], 4)
    assert "all on loopback" in out


def test_torchrun_two_nodes_on_loopback():
    _need("torchrun")
    port = free_loopback_port()
    cmd = lambda node: ["torchrun", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "2",  # noqa: E731
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "ep-test", CHECK]
    procs = [subprocess.Popen(cmd(node), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    _expect_ok(outs, 4)


def test_mpirun_four_ranks():
    _need("mpirun")
    pytest.importorskip("mpi4py") if not os.environ.get("CI") else None
    out = _run(["mpirun", "-np", "4", sys.executable, CHECK, "--sockets"], 4)
    assert "launcher mpi" in out and "all on loopback" in out


def test_slurm_variables_by_hand():
    port = free_loopback_port()
    procs = []
    for rank in range(3):
        env = _env(SLURM_PROCID=str(rank), SLURM_NTASKS="3", SLURM_LOCALID=str(rank), SLURM_NNODES="1",
                   SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, CHECK, "--sockets"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-3000:] for o in outs)
    assert "launcher slurm" in _expect_ok(outs, 3)
