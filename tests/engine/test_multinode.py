"""Multi-node training on one machine: two hosts are two network namespaces joined by a veth pair
(tests/engine/netns.py), each running its ranks on the CPU (gloo, DeepSpeed's CPU accelerator); one
directory serves as the cluster's shared filesystem.

- torchrun (c10d rendezvous) and the deepspeed launcher (hostfile, --no_ssh --node_rank) start
  2 nodes x 1 rank under ZeRO-2 and ZeRO-3: the loss sequence is bitwise that of one node with two
  ranks (same seed); only global rank 0 writes logs, samples and `latest`, every rank its shards;
- killing every process of node 1 mid-run makes node 0 exit quickly with an error naming a lost peer;
  starting both nodes again resumes from the last complete checkpoint, and the run ends as the
  uninterrupted one, nothing lost;
- a resume with another world size is refused naming the ranks the checkpoint needs;
- `engine.sample` across the two nodes gives the images of one process.
Every process has a timeout; the namespaces are deleted even when a test fails."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import numpy as np
import pytest

from tests.engine.netns import TwoHosts, unavailable_reason
from tests.engine.trainer_fixtures import (PYTHON, REPO, env, free_port, launch, tiny_config, write_config,
                                           write_zero3_json)

BIN = os.path.dirname(PYTHON)
STEPS, EVERY = 8, 2
RUN_TIMEOUT = 420            # seconds for one run (about a minute on two busy cores; more while DeepSpeed JIT-builds)
PEER_TIMEOUT_S = 20          # train.collective_timeout_s of the failure run

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"two network namespaces cannot be made here: {REASON}")


@pytest.fixture(scope="module")
def hosts():
    with TwoHosts() as two:
        yield two


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("multinode_data")


def experiment(tmp, data_root, stage: int, **train) -> str:
    ds = "configs/deepspeed/zero2.json" if stage == 2 else write_zero3_json(tmp / "zero3.json")
    raw = tiny_config(tmp / "run", data_root, train=dict(max_steps=STEPS, deepspeed_config=ds, **train),
                      checkpoint=dict(every=EVERY, keep_last=STEPS), logging=dict(sample_every=4),
                      sample=dict(num_images=4))
    return write_config(raw, tmp / "config.yaml")


def losses(run_dir) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run's records replace the earlier ones)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def node_env(tmp, **extra) -> dict:
    e = env()
    e.update(ALIGNFLOW_AUDIT_ROOT=str(tmp / "run"), ALIGNFLOW_AUDIT_DIR=str(tmp / "audit"), **extra)
    return e


def torchrun(hosts, node: int, port: int, run_id: str, module_args: list[str]) -> list[str]:
    # c10d ranks the nodes by address (--local-addr), not by --node-rank: node 0 holds global rank 0
    return [os.path.join(BIN, "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts.addresses[0]}:{port}", "--rdzv-id", run_id,
            "--rdzv-conf", f"is_host={int(node == 0)},join_timeout=120", "--local-addr", hosts.addresses[node],
            "--max-restarts", "0", "-m", "tests.engine.audited", *module_args]


def deepspeed_no_ssh(hosts, node: int, port: int, hostfile, module_args: list[str]) -> list[str]:
    return [os.path.join(BIN, "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
            "--master_addr", hosts.addresses[0], "--master_port", str(port), "--num_gpus", "1",
            "--module", "tests.engine.audited", *module_args]


def start_nodes(hosts, tmp, launcher: str, module_args: list[str], name: str, **env_extra):
    port = free_port()
    hostfile = tmp / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    procs = []
    for node in (0, 1):
        cmd = (torchrun(hosts, node, port, f"{name}-{port}", module_args) if launcher == "torchrun"
               else deepspeed_no_ssh(hosts, node, port, hostfile, module_args))
        procs.append(hosts.popen(node, cmd, node_env(tmp, **env_extra), tmp / f"{name}_node{node}.log", REPO))
    return procs


def check_writes(tmp) -> None:
    """Rank 0 alone writes logs, samples and `latest`; rank 1 only its own checkpoint files."""
    written = {rank: json.loads((tmp / "audit" / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert "metrics.jsonl" in written[0] and "checkpoints/latest" in written[0]
    assert any(p.startswith("samples_step") for p in written[0]) and "samples.npz" in written[0]
    for path in written[1]:
        parts = path.split("/")
        # its own files: ours are named rank1, DeepSpeed's ZeRO shards zero_pp_rank_1_...
        own = len(parts) == 2 or re.search(r"rank_?1(?!\d)", parts[-1]) is not None
        assert parts[0] == "checkpoints" and len(parts) >= 2 and own, f"rank 1 wrote {path}"
        assert parts[1].startswith((".tmp-step_", "step_")), f"rank 1 wrote {path}"
    for tag in (f"step_{EVERY:08d}", f"step_{STEPS:08d}"):
        files = set(os.listdir(tmp / "run" / "checkpoints" / tag))
        assert {"trainer_rank0.pt", "trainer_rank1.pt"} <= files, files
        assert {f for f in files if f.startswith("zero_pp_rank_1") or f.startswith("zero_pp_rank_0")}, files


@pytest.fixture(scope="module")
def single_node(tmp_path_factory, data_root):
    """The references: one node with two ranks (deepspeed launcher, loopback), ZeRO-2 and ZeRO-3."""
    out = {}
    for stage in (2, 3):
        tmp = tmp_path_factory.mktemp(f"one_node_zero{stage}")
        launch(["--config", experiment(tmp, data_root, stage)], timeout=RUN_TIMEOUT)
        out[stage] = losses(tmp / "run")
        assert sorted(out[stage]) == list(range(1, STEPS + 1))
    return out


@pytest.fixture(scope="module")
def two_nodes_zero2(hosts, tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("two_nodes_zero2")
    procs = start_nodes(hosts, tmp, "torchrun", ["engine.train", "--config", experiment(tmp, data_root, 2)], "train")
    hosts.wait_all(procs, RUN_TIMEOUT)
    return tmp


@pytest.mark.parametrize("stage,launcher", [(2, "torchrun"), (3, "deepspeed")])
def test_two_nodes_train_as_one(hosts, tmp_path, data_root, single_node, two_nodes_zero2, stage, launcher):
    if stage == 2:
        tmp = two_nodes_zero2
    else:
        tmp = tmp_path
        procs = start_nodes(hosts, tmp, launcher, ["engine.train", "--config", experiment(tmp, data_root, stage)],
                            "train")
        logs = hosts.wait_all(procs, RUN_TIMEOUT)
        assert "rank 0/2 on cpu" in logs[0]
    # bitwise: two ranks sum the same two numbers whether gloo crosses the veth or loopback
    assert losses(tmp / "run") == single_node[stage]
    check_writes(tmp)
    assert (tmp / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


def test_resume_with_another_world_size_is_refused(two_nodes_zero2):
    """The two-node checkpoint resumed by one process: refused, naming the two ranks it needs."""
    config = str(two_nodes_zero2 / "config.yaml")
    proc = subprocess.run([PYTHON, "-m", "engine.train", "--config", config, f"train.max_steps={STEPS + 2}"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode != 0
    assert "written with world size 2 (2 node(s) x 1 rank(s)), this run has 1" in proc.stderr, proc.stderr[-3000:]


def test_lost_node_stops_the_other_and_restart_resumes(hosts, tmp_path, data_root, single_node):
    config = experiment(tmp_path, data_root, 2, collective_timeout_s=PEER_TIMEOUT_S)
    args = ["engine.train", "--config", config]
    procs = start_nodes(hosts, tmp_path, "torchrun", args, "first", ALIGNFLOW_TEST_STEP_DELAY_S="0.5")
    latest = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.time() + RUN_TIMEOUT
    while not (latest.exists() and latest.read_text().strip() >= f"step_{EVERY:08d}"):
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            "\n".join(open(p.log_path).read()[-3000:] for p in procs)
        time.sleep(0.05)
    killed = hosts.kill_node(1)                # every process of node 1: its launcher and its rank
    assert len(killed) >= 2, killed
    procs[1].wait(timeout=30)
    killed_at = time.time()
    try:
        procs[0].wait(timeout=PEER_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node 0 still runs {PEER_TIMEOUT_S + 60} s after node 1 was killed")
    exit_s = time.time() - killed_at
    log0 = open(procs[0].log_path).read()
    assert procs[0].returncode != 0 and "PeerLostError" in log0 and "lost a peer at step" in log0, log0[-4000:]
    assert "train.collective_timeout_s=20" in log0 and "Restart every node" in log0
    first = losses(tmp_path / "run")
    stopped = max(first)
    assert stopped < STEPS, "the run ended before node 1 was killed"
    resume_tag = latest.read_text().strip()

    procs = start_nodes(hosts, tmp_path, "torchrun", args, "restart")
    logs = hosts.wait_all(procs, RUN_TIMEOUT)
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / resume_tag}" in logs[0]
    # the steps before the kill, and all of the resumed run, are those of the uninterrupted run
    assert {s: v for s, v in first.items()} == {s: single_node[2][s] for s in first}
    assert losses(tmp_path / "run") == single_node[2]
    print(f"node 0 exited {exit_s:.1f} s after node 1 was killed (at step {stopped}); resumed from {resume_tag}")


def test_sampler_across_two_nodes_gives_the_images_of_one_process(hosts, two_nodes_zero2, tmp_path):
    from engine.sample import main as sample_main

    ckpt = str(two_nodes_zero2 / "run" / "checkpoints")
    common = ["--ckpt", ckpt, "--num-images", "6", "--batch-size", "2", "--num-steps", "2", "--device", "cpu"]
    procs = start_nodes(hosts, tmp_path, "torchrun", ["engine.sample", *common, "--out", str(tmp_path / "two")],
                        "sample")
    hosts.wait_all(procs, RUN_TIMEOUT)
    one = sample_main([*common, "--out", str(tmp_path / "one")])
    with np.load(tmp_path / "two" / "samples.npz") as two, np.load(one["npz"]) as ref:
        assert two["arr_0"].shape == (6, 16, 16, 3)
        np.testing.assert_array_equal(two["arr_0"], ref["arr_0"])
        np.testing.assert_array_equal(two["labels"], ref["labels"])
