"""engine.distributed: the process facts shared by the trainer, the sampler and preprocessing."""
import pytest
import torch

from engine.distributed import local_cuda_device, share_cpu_cores


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    assert local_cuda_device(0) == torch.device("cuda", 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=1 but this process sees 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES=3\).*--num_gpus 1"):
        local_cuda_device(1)


def test_cpu_ranks_share_the_cores(monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setattr("os.cpu_count", lambda: 8)
        share_cpu_cores(2)
        assert torch.get_num_threads() == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        share_cpu_cores(2)  # the user's setting wins
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)


# -- the launcher's environment ------------------------------------------------------------------

from engine.distributed import (expand_hostlist, init_distributed, slurm_environment,  # noqa: E402
                                world_size_from_env)

LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "DS_ACCELERATOR")


@pytest.mark.parametrize("spec,hosts", [
    ("node7", ["node7"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[8-11]b", ["a8b", "a9b", "a10b", "a11b"]),
    ("r1n[009-010],r2n[1]", ["r1n009", "r1n010", "r2n1"]),
])
def test_slurm_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


def test_slurm_hostlist_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match=r"cannot read the range 'x'"):
        expand_hostlist("gpu[x]")


def test_slurm_tasks_become_ranks():
    # srun -N 2 --ntasks-per-node 4: task 6 is node 1's local rank 2; node 0 of the list is the master
    slurm = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
             "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[17-18]", "SLURM_JOB_ID": "123456"}
    env = slurm_environment(slurm)
    assert env == {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "gpu17", "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert world_size_from_env(slurm) == 8
    # uneven nodes: "3(x2),2" gives node 2 two tasks; the user's MASTER_ADDR / MASTER_PORT win
    env = slurm_environment({**slurm, "SLURM_NODEID": "2", "SLURM_TASKS_PER_NODE": "3(x2),2",
                             "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"})
    assert env["LOCAL_WORLD_SIZE"] == "2" and "MASTER_ADDR" not in env and "MASTER_PORT" not in env
    # torchrun / deepspeed inside an allocation set RANK: their variables win
    assert slurm_environment({**slurm, "RANK": "0"}) == {}
    assert slurm_environment({"PATH": "/bin"}) == {} and world_size_from_env({"WORLD_SIZE": "3"}) == 3
    with pytest.raises(ValueError, match="SLURM_PROCID is set but SLURM_NTASKS, SLURM_LOCALID not"):
        slurm_environment({"SLURM_PROCID": "0"})


def test_slurm_task_joins_with_its_local_rank(monkeypatch):
    """A single SLURM task (no process group needed): its ranks come from SLURM's variables and end up
    in the environment DeepSpeed and torch read."""
    for key in LAUNCH_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    for key, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
                       "SLURM_JOB_NODELIST": "node[3-4]", "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(key, value)
    info = init_distributed("cpu")
    assert (info.rank, info.local_rank, info.world_size, info.device, info.owns_group) == (0, 0, 1, torch.device("cpu"), False)
    import os
    assert os.environ["MASTER_ADDR"] == "node3" and os.environ["MASTER_PORT"] == "20007"


@pytest.mark.parametrize("env,message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2, WORLD_SIZE=2 in the environment; need 0 <= RANK < WORLD_SIZE"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, r"LOCAL_RANK=2 with RANK=1"),
    ({"RANK": "one"}, r"RANK='one' in the environment is not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, r"WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT not set"),
])
def test_bad_launch_environment_is_named(monkeypatch, env, message):
    for key in LAUNCH_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        init_distributed("cpu")


def test_bad_device_and_timeout_are_named(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    for key in LAUNCH_KEYS:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match=r"device 'tpu'; allowed: 'cuda', 'cuda:N' or 'cpu'"):
        init_distributed("tpu")
    with pytest.raises(ValueError, match=r"collective timeout 0 s; need a positive number of seconds"):
        init_distributed("cpu", timeout_s=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda': CUDA is not available here; use cpu"):
            init_distributed("cuda")


def test_the_local_rank_picks_the_gpu(monkeypatch):
    """Global rank 3 of 4 on its node's second GPU: cuda:LOCAL_RANK (1), never cuda:RANK (3), and the
    group joins with the environment's rank and world size and the timeout asked for."""
    import torch.distributed as dist

    for key in LAUNCH_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    picked, joined = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.append((backend, kw)))
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    info = init_distributed("cuda", timeout_s=30)
    assert info.device == torch.device("cuda", 1) and picked == [1]
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (3, 1, 4, 2)
    from datetime import timedelta
    assert joined == [("nccl", dict(rank=3, world_size=4, timeout=timedelta(seconds=30)))]
    # the same from SLURM's variables (srun, one task per GPU)
    picked.clear()
    for key in env:
        monkeypatch.delenv(key)
    for key, value in {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                       "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "gpu[1-2]"}.items():
        monkeypatch.setenv(key, value)
    info = init_distributed("cuda")
    assert info.device == torch.device("cuda", 1) and picked == [1] and (info.rank, info.world_size) == (3, 4)
    with pytest.raises(ValueError, match=r"device 'cuda:0' with WORLD_SIZE=4 would put every rank on one GPU"):
        init_distributed("cuda:0")


def test_a_hung_peer_times_out_every_group():
    """The collective timeout bounds the wait for a rank that is alive but silent, on the world group
    and on groups made after it (DeepSpeed's), and the error is recognised as a communication failure."""
    import json
    import subprocess

    from tests.engine.trainer_fixtures import PYTHON, REPO, env, free_port

    timeout_s, port, procs = 3, str(free_port()), []
    for rank in (0, 1):
        e = env()
        e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([PYTHON, "-m", "tests.engine.timeout_worker", str(timeout_s)], cwd=REPO,
                                      env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        output = procs[0].communicate(timeout=120)[0]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
    result = json.loads(output.strip().splitlines()[-1])
    for name in ("world", "later"):
        failure = result[name]
        assert failure.get("collective_failure") is True, (name, output[-3000:])
        assert timeout_s * 0.8 <= failure["seconds"] <= timeout_s + 10, (name, failure)


@pytest.mark.parametrize("owns_group", [True, False])
def test_a_command_destroys_only_the_group_it_created_even_on_error(monkeypatch, owns_group):
    """engine.sample / evaluate / preprocess run inside command_process: the group init_distributed
    created is destroyed on the way out (an error included); one made by the caller is left alone."""
    import engine.distributed as distributed

    made = distributed.DistInfo(0, 0, 1, torch.device("cpu"), owns_group=owns_group)
    asked, destroyed = [], []
    monkeypatch.setattr(distributed, "init_distributed", lambda device, **kw: asked.append((device, kw)) or made)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: destroyed.append(True))
    with pytest.raises(KeyError, match="boom"):
        with distributed.command_process("cpu", local_rank=0, timeout_s=5.0) as info:
            assert info is made and not destroyed
            raise KeyError("boom")
    assert asked == [("cpu", {"local_rank": 0, "timeout_s": 5.0})]
    assert destroyed == ([True] if owns_group else [])


def _collectives_rank(rank: int, init_file: str, results: str) -> None:
    """One of two gloo ranks for test_run_on_main_and_gather_sorted_agree_on_every_rank."""
    import json

    import torch.distributed as dist

    from engine.distributed import DistInfo, gather_sorted, run_on_main

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    info = DistInfo(rank, rank, 2, torch.device("cpu"))
    out = {"result": run_on_main(info, lambda: [rank, "made on rank 0"]),
           "gathered": gather_sorted(info, [10 * rank + 3, rank])}
    try:
        run_on_main(info, lambda: 1 / 0)
    except ZeroDivisionError as error:
        out["error"] = str(error)
    dist.destroy_process_group()
    with open(f"{results}.{rank}", "w") as f:
        json.dump(out, f)


def test_run_on_main_and_gather_sorted_agree_on_every_rank(tmp_path):
    """run_on_main: rank 0's result, or its error, on every rank (so none waits for a rank that
    failed); gather_sorted: every rank's values, sorted, on every rank."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_collectives_rank, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    for rank in (0, 1):
        out = json.loads((tmp_path / f"out.{rank}").read_text())
        assert out == {"result": [0, "made on rank 0"], "gathered": [0, 1, 3, 13], "error": "division by zero"}
