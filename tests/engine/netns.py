"""Two hosts on one machine: network namespaces joined by a veth pair, for the multi-node tests.

Each "node" is a namespace with loopback up and one address of a private /30 (10.231.0.1 and
10.231.0.2); traffic flows only between those two addresses. Processes run in a node through
`ip netns exec`; both nodes see the same filesystem, which serves as the cluster's shared one.
Names carry the creating process's id, so concurrent test sessions do not collide, and namespaces
left by a crashed session (whose process is gone) are deleted first.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

PREFIX = "afmn"                       # namespaces afmn<pid>n0 / afmn<pid>n1, veths afmn<pid>v0 / v1
ADDRESSES = ("10.231.0.1", "10.231.0.2")
PREFIX_LEN = 30


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers() -> list[str]:
    """Delete the namespaces of earlier sessions whose process is gone; returns their names."""
    removed = []
    listing = _ip("netns", "list", check=False).stdout
    for name in re.findall(rf"^({PREFIX}(\d+)n[01])\b", listing, flags=re.M):
        if not _alive(int(name[1])):
            _ip("netns", "del", name[0], check=False)
            removed.append(name[0])
    return removed


def unavailable_reason() -> str | None:
    """Why two namespaces cannot be made here (None where they can)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"{PREFIX}{os.getpid()}probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class TwoHosts:
    """`with TwoHosts() as hosts:` two namespaces, deleted on exit (even on failure)."""

    def __init__(self):
        tag = f"{PREFIX}{os.getpid()}"
        self.names = (f"{tag}n0", f"{tag}n1")
        self.veths = (f"{tag}v0", f"{tag}v1")
        self.addresses = ADDRESSES
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "TwoHosts":
        clean_leftovers()
        try:
            for name in self.names:
                _ip("netns", "del", name, check=False)
                _ip("netns", "add", name)
            _ip("link", "add", self.veths[0], "type", "veth", "peer", "name", self.veths[1])
            for name, veth, address in zip(self.names, self.veths, self.addresses):
                _ip("link", "set", veth, "netns", name)
                _ip("-n", name, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", veth)
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("-n", name, "link", "set", veth, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for proc in self.procs:
            self.kill(proc)
        for node in (0, 1):
            self.kill_node(node)
        for name in self.names:  # deleting a namespace deletes its end of the veth pair, and so both
            _ip("netns", "del", name, check=False)

    def env(self, node: int, base: dict) -> dict:
        """`base` with the variables that make gloo (and a launcher) use this node's address."""
        e = dict(base)
        e.update(GLOO_SOCKET_IFNAME=self.veths[node], TP_SOCKET_IFNAME=self.veths[node])
        return e

    def popen(self, node: int, cmd: list[str], env: dict, log_path, cwd: str) -> subprocess.Popen:
        """Start `cmd` in node `node`, in its own process group (so that all of it can be killed),
        stdout and stderr to `log_path`."""
        log = open(log_path, "w")
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[node], *cmd], cwd=cwd, env=self.env(node, env),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        proc.log_path = str(log_path)
        self.procs.append(proc)
        return proc

    def kill_node(self, node: int) -> list[int]:
        """SIGKILL every process in node `node`'s namespace (launchers start their ranks in sessions of
        their own, so a process group is not the whole node); returns their ids."""
        pids = [int(p) for p in _ip("netns", "pids", self.names[node], check=False).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal every process of `proc`'s group (the node's launcher and all its ranks)."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def wait_all(self, procs, timeout: float) -> list[str]:
        """Wait for `procs` (killing all of them at `timeout`); returns their logs. Raises
        AssertionError naming the node that failed or did not finish."""
        deadline = time.time() + timeout
        timed_out = []
        for i, proc in enumerate(procs):
            try:
                proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                timed_out.append(i)
        for proc in procs:
            if proc.poll() is None:
                self.kill(proc)
        logs = [open(proc.log_path).read() for proc in procs]
        problems = [f"node {i} did not finish within {timeout:.0f} s" for i in timed_out]
        problems += [f"node {i} exited with {proc.returncode}" for i, proc in enumerate(procs)
                     if i not in timed_out and proc.returncode != 0]
        if problems:
            raise AssertionError("; ".join(problems) + "".join(
                f"\n--- node {i} ---\n{log[-5000:]}" for i, log in enumerate(logs)))
        return logs
