"""A private SLURM cluster on one machine: munged, slurmctld and N emulated `slurmd -N`.

Used by `tests/slurm/` and handy for trying `scripts/slurm/` without a real cluster:

    python -m grail_megatron.launch.minicluster up /tmp/gm-slurm   # prints `export SLURM_CONF=...`
    python -m grail_megatron.launch.minicluster down /tmp/gm-slurm

Everything lives under one directory (config, munge key and socket, state, spool, logs);
the daemons run in the foreground as children of this process (or are recorded in
`pids.json` by `up`) and are stopped by PID, never by name, so other users' SLURM or munge
are untouched. Nodes are `NodeName=<n> NodeAddr=127.0.0.1 Port=<p>` with
proctrack/linuxproc, task/none and select/cons_tres: what works without cgroups or systemd.
Scheduling intervals are shortened so a submitted job starts within about a second.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class MiniClusterError(RuntimeError):
    """The local SLURM cluster could not be started or stopped cleanly."""


@dataclass(frozen=True)
class MiniClusterSpec:
    root: Path
    nodes: tuple[str, ...] = ("n1", "n2")
    cpus_per_node: int = 2
    memory_mb_per_node: int = 4096
    partition: str = "debug"
    cluster_name: str = "gmtest"
    start_timeout_s: float = 30.0
    # Memory as a consumable resource (CR_Core_Memory) and a partition default (DefMemPerNode,
    # MiB; 0 = none), as on sites that enforce memory: jobs without --mem get that much.
    track_memory: bool = False
    partition_default_mem_mb: int = 0


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if not found:
        raise MiniClusterError(
            f"{name} not found: install the Debian packages slurmctld slurmd slurm-client munge "
            "(`make setup` runs tools/system_deps.sh)"
        )
    return found


def free_ports(count: int) -> list[int]:
    """Distinct ports that are free right now (bound together so they cannot repeat)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class _Paths:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_key(self) -> Path:
        return self.root / "munge" / "munge.key"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def logs(self) -> Path:
        return self.root / "log"

    @property
    def pids(self) -> Path:
        return self.root / "pids.json"


def render_slurm_conf(spec: MiniClusterSpec, paths: _Paths, ctld_port: int, node_ports: list[int]) -> str:
    host = socket.gethostname()
    lines = [
        f"ClusterName={spec.cluster_name}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire also sets how long a requeued job waits before it may start again
        # (default 120 s): keep it short so a requeued job restarts within seconds.
        f"AuthInfo=socket={paths.munge_socket},cred_expire=5",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={paths.state}",
        f"SlurmdSpoolDir={paths.root}/spool/%n",
        f"SlurmctldPidFile={paths.root}/slurmctld.pid",
        f"SlurmdPidFile={paths.root}/slurmd-%n.pid",
        f"SlurmctldLogFile={paths.logs}/slurmctld.log",
        f"SlurmdLogFile={paths.logs}/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # No cgroups or systemd here: track processes by parentage, no task binding.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory" if spec.track_memory else "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        # The emulated nodes share the real hardware: trust the configured CPUs/memory.
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "JobRequeue=1",
        # Start jobs within a second of submission or requeue; notice ends quickly.
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=100000",
        "MessageTimeout=10",
        "KillWait=5",
        "MinJobAge=600",
        "InactiveLimit=0",
        "SlurmdTimeout=60",
        "SlurmctldTimeout=60",
    ]
    for name, port in zip(spec.nodes, node_ports):
        lines.append(
            f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={spec.cpus_per_node} RealMemory={spec.memory_mb_per_node} State=UNKNOWN"
        )
    lines.append(
        f"PartitionName={spec.partition} Nodes={','.join(spec.nodes)} Default=YES "
        "MaxTime=INFINITE State=UP OverSubscribe=NO"
        + (f" DefMemPerNode={spec.partition_default_mem_mb}" if spec.partition_default_mem_mb else "")
    )
    return "\n".join(lines) + "\n"


@dataclass
class MiniCluster:
    """Start with `start()` (or `with MiniCluster(spec) as cluster:`), stop with `stop()`."""

    spec: MiniClusterSpec
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.paths = _Paths(self.spec.root)

    # ----------------------------------------------------------------- public API
    @property
    def conf(self) -> Path:
        return self.paths.conf

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for SLURM clients (sbatch, squeue, ...) talking to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.paths.conf)
        return env

    def start(self) -> "MiniCluster":
        try:
            self._write_files()
            self._start_munged()
            self._start_daemon("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            for node in self.spec.nodes:
                self._start_daemon(f"slurmd-{node}", [_binary("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
            self._wait_nodes_idle()
        except BaseException:
            self.stop()
            raise
        self.paths.pids.write_text(json.dumps({name: p.pid for name, p in self.procs.items()}))
        return self

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(list(args), env=self.env(), capture_output=True, text=True, check=check, timeout=timeout)

    def job_processes(self) -> list[tuple[int, str]]:
        """Processes (pid, command line) started through this cluster, apart from its daemons.

        Every job step inherits SLURM_CONF from sbatch, so a process whose environment names
        this cluster's slurm.conf and which is not one of the daemons was left by a job.
        """
        daemons = {p.pid for p in self.procs.values()}
        return [(pid, cmd) for pid, cmd in _processes_with_env("SLURM_CONF", str(self.conf))
                if pid not in daemons and _parent(pid) not in daemons and pid != os.getpid()]

    def stop(self, drain_timeout_s: float = 30.0) -> list[tuple[int, str]]:
        """Cancel all jobs, stop daemons by PID; returns the job processes that had to be killed."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--user", str(os.getuid()), check=False)
            deadline = time.monotonic() + drain_timeout_s
            while time.monotonic() < deadline and self._queue_not_empty():
                time.sleep(0.5)
        leftovers = self.job_processes()
        for pid, _ in leftovers:
            _kill_quietly(pid, signal.SIGKILL)
        # Workers before the controller before munge: each still needs the next one to exit cleanly.
        order = [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.pop(name, None)
            if proc is not None:
                _terminate(proc)
        self.paths.pids.unlink(missing_ok=True)
        return leftovers

    def __enter__(self) -> "MiniCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- internals
    def _write_files(self) -> None:
        p = self.paths
        for d in (p.root, p.state, p.logs, p.munge_key.parent, *(p.root / "spool" / n for n in self.spec.nodes)):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(p.munge_key.parent, 0o700)
        if not p.munge_key.exists():
            p.munge_key.write_bytes(secrets.token_bytes(1024))
            os.chmod(p.munge_key, 0o400)
        ctld_port, *node_ports = free_ports(1 + len(self.spec.nodes))
        tmp = p.conf.with_suffix(".tmp")
        tmp.write_text(render_slurm_conf(self.spec, p, ctld_port, node_ports))
        tmp.replace(p.conf)

    def _start_munged(self) -> None:
        p = self.paths
        cmd = [
            _binary("munged"), "--foreground", "--force",
            f"--socket={p.munge_socket}", f"--key-file={p.munge_key}",
            f"--pid-file={p.root}/munge/munged.pid", f"--log-file={p.logs}/munged.log",
            f"--seed-file={p.root}/munge/munged.seed",
        ]
        self._start_daemon("munged", cmd)
        self._poll(lambda: p.munge_socket.exists(), "munged to create its socket", "munged")

    def _start_daemon(self, name: str, cmd: list[str]) -> None:
        out = open(self.paths.logs / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env(), start_new_session=True,
        )
        out.close()

    def _poll(self, ready, what: str, log_name: str) -> None:
        deadline = time.monotonic() + self.spec.start_timeout_s
        while not ready():
            dead = [n for n, proc in self.procs.items() if proc.poll() is not None]
            if dead:
                raise MiniClusterError(f"{', '.join(dead)} exited while waiting for {what}; see {self.paths.logs}")
            if time.monotonic() > deadline:
                raise MiniClusterError(
                    f"timed out after {self.spec.start_timeout_s:.0f} s waiting for {what}; "
                    f"see {self.paths.logs}/{log_name}*"
                )
            time.sleep(0.2)

    def node_states(self) -> dict[str, str]:
        res = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=15)
        states = {}
        for line in res.stdout.splitlines():
            name, _, state = line.partition(" ")
            states[name] = state.strip()
        return states

    def _wait_nodes_idle(self) -> None:
        def all_idle() -> bool:
            states = self.node_states()
            return all(states.get(n, "").startswith("idle") for n in self.spec.nodes)

        self._poll(all_idle, f"nodes {', '.join(self.spec.nodes)} to be idle", "slurm")

    def _queue_not_empty(self) -> bool:
        res = self.run("squeue", "-h", "-o", "%i", check=False, timeout=15)
        return res.returncode == 0 and bool(res.stdout.strip())


def _processes_with_env(key: str, value: str) -> list[tuple[int, str]]:
    needle = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                found.append((int(entry.name), cmd))
        except OSError:  # exited meanwhile, or a kernel thread
            continue
    return found


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _kill_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop_pid(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s` (slurmctld can hang in shutdown once its state is saved)."""
    _kill_quietly(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if _state(pid) == "Z":
            return  # exited; its parent (not us) has to reap it
        time.sleep(0.1)
    _kill_quietly(pid, signal.SIGKILL)


def _terminate(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)


# --------------------------------------------------------------------------- CLI
def _cmd_up(args: argparse.Namespace) -> int:
    spec = MiniClusterSpec(root=Path(args.root), nodes=tuple(args.nodes.split(",")), cpus_per_node=args.cpus)
    cluster = MiniCluster(spec).start()
    # Detach: the daemons keep running after this process exits; `down` stops them by PID.
    for proc in cluster.procs.values():
        proc.returncode = 0  # keep Popen.__del__ from warning about running children
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    paths = _Paths(Path(args.root))
    if not paths.pids.exists():
        print(f"no cluster recorded in {paths.pids}", file=sys.stderr)
        return 1
    pids: dict[str, int] = json.loads(paths.pids.read_text())
    env = dict(os.environ, SLURM_CONF=str(paths.conf))
    subprocess.run(["scancel", "--user", str(os.getuid())], env=env, check=False, capture_output=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, check=False)
        if q.returncode != 0 or not q.stdout.strip():
            break
        time.sleep(0.5)
    daemon_pids = set(pids.values())
    for pid, _ in _processes_with_env("SLURM_CONF", str(paths.conf)):
        if pid not in daemon_pids and pid != os.getpid():
            _kill_quietly(pid, signal.SIGKILL)
    for name in [n for n in pids if n.startswith("slurmd-")] + ["slurmctld", "munged"]:
        if name in pids:
            _stop_pid(pids[name])
    paths.pids.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grail_megatron.launch.minicluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start munged, slurmctld and the emulated slurmd nodes")
    up.add_argument("root")
    up.add_argument("--nodes", default="n1,n2")
    up.add_argument("--cpus", type=int, default=2, help="CPUs per emulated node")
    up.set_defaults(fn=_cmd_up)
    down = sub.add_parser("down", help="cancel jobs and stop the daemons started by `up`")
    down.add_argument("root")
    down.set_defaults(fn=_cmd_down)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
