"""Wait until a SLURM job's Ray cluster is complete, then prove every node runs tasks.

    python -m grail_megatron.launch.ray_cluster --address HOST:PORT --nodes n1,n2 \
        --gpus-per-node 8 --timeout 300 [--probe] [--json out.json]

Every Ray node started by `scripts/slurm/ray_node.sh` carries a custom resource
`slurm_node_<name>` = 1 naming its SLURM node (`SLURMD_NODENAME`). That tag, not the IP,
identifies nodes: several Ray nodes may share an address (emulated nodes in tests,
several jobs on one host), and the tag is also what `--probe` uses to place one task on each
node. The wait polls `ray.nodes()` until every expected node is alive with its GPUs (and at
least `--cpus-per-node` CPUs), and fails after the deadline with the names of the missing or
incomplete nodes. Exit codes: 0 ready, 3 not ready in time, 4 probe failed, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

NODE_TAG_PREFIX = "slurm_node_"
EXIT_NOT_READY = 3
EXIT_PROBE_FAILED = 4


class ClusterNotReady(RuntimeError):
    """The Ray cluster did not reach the expected shape before the deadline."""


def node_tag(slurm_node: str) -> str:
    """The custom Ray resource that marks the Ray node running on `slurm_node`."""
    return f"{NODE_TAG_PREFIX}{slurm_node}"


@dataclass(frozen=True)
class Expectation:
    nodes: tuple[str, ...]
    gpus_per_node: int = 0
    cpus_per_node: int = 0  # minimum; 0 accepts any count

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("expected at least one node")
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError(f"duplicate node names in {list(self.nodes)}")
        if self.gpus_per_node < 0 or self.cpus_per_node < 0:
            raise ValueError("gpus_per_node and cpus_per_node must be >= 0")


@dataclass(frozen=True)
class NodeState:
    name: str
    node_id: str
    address: str
    cpus: float
    gpus: float


def joined_nodes(ray_nodes: Iterable[dict]) -> dict[str, NodeState]:
    """SLURM node name -> state, for the alive Ray nodes that carry a node tag."""
    joined: dict[str, NodeState] = {}
    for node in ray_nodes:
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        for key in resources:
            if key.startswith(NODE_TAG_PREFIX):
                name = key[len(NODE_TAG_PREFIX):]
                joined[name] = NodeState(
                    name=name,
                    node_id=node.get("NodeID", ""),
                    address=node.get("NodeManagerAddress", ""),
                    cpus=float(resources.get("CPU", 0)),
                    gpus=float(resources.get("GPU", 0)),
                )
    return joined


def problems(expect: Expectation, joined: dict[str, NodeState]) -> list[str]:
    """Human-readable reasons the cluster is not ready yet; empty when it is."""
    missing = [n for n in expect.nodes if n not in joined]
    issues = [f"missing node(s): {', '.join(missing)}"] if missing else []
    for name in expect.nodes:
        state = joined.get(name)
        if state is None:
            continue
        if state.gpus < expect.gpus_per_node:
            issues.append(f"node {name} has {state.gpus:g}/{expect.gpus_per_node} GPUs")
        if state.cpus < expect.cpus_per_node:
            issues.append(f"node {name} has {state.cpus:g}/{expect.cpus_per_node} CPUs")
    return issues


def wait_for_nodes(
    list_nodes: Callable[[], list[dict]],
    expect: Expectation,
    timeout_s: float,
    poll_s: float = 0.5,
    report: Callable[[str], None] = print,
    report_every_s: float = 10.0,
) -> dict[str, NodeState]:
    """Poll `list_nodes()` (ray.nodes) until `expect` is met; raise ClusterNotReady at the deadline."""
    start = time.monotonic()
    last_report = start
    while True:
        joined = joined_nodes(list_nodes())
        issues = problems(expect, joined)
        if not issues:
            return {n: joined[n] for n in expect.nodes}
        now = time.monotonic()
        if now - start >= timeout_s:
            have = ", ".join(sorted(joined)) or "none"
            raise ClusterNotReady(
                f"Ray cluster not ready after {timeout_s:g} s: {'; '.join(issues)} (joined: {have}). "
                "Check the Ray logs of those nodes in the job log and their temp dirs."
            )
        if now - last_report >= report_every_s:
            report(f"[ray] waiting ({now - start:.0f} s): {len(joined)}/{len(expect.nodes)} nodes; {'; '.join(issues)}")
            last_report = now
        time.sleep(poll_s)


def connect(address: str, timeout_s: float) -> None:
    """ray.init against an existing cluster, retrying while its head is still coming up."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING", configure_logging=False)
            return
        except ConnectionError as exc:
            if time.monotonic() > deadline:
                raise ClusterNotReady(f"cannot connect to the Ray head at {address} within {timeout_s:g} s: {exc}") from exc
            time.sleep(1.0)


def _where_am_i() -> dict:
    import ray

    return {
        "slurm_node": os.environ.get("SLURMD_NODENAME", ""),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(),
    }


def probe(nodes: dict[str, NodeState], timeout_s: float) -> dict[str, dict]:
    """Run one task pinned to each node by its tag; check it ran on that Ray node."""
    import ray

    where = ray.remote(num_cpus=0)(_where_am_i)
    refs = {name: where.options(resources={node_tag(name): 0.001}).remote() for name in nodes}
    results = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    wrong = [
        f"{name}: task ran on Ray node {res['node_id'][:12]} (SLURM node {res['slurm_node'] or '?'}), "
        f"expected {nodes[name].node_id[:12]}"
        for name, res in results.items()
        if res["node_id"] != nodes[name].node_id or (res["slurm_node"] and res["slurm_node"] != name)
    ]
    if wrong:
        raise ClusterNotReady("probe tasks ran on the wrong nodes: " + "; ".join(wrong))
    return results


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m grail_megatron.launch.ray_cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--address", required=True, help="Ray head GCS address host:port")
    parser.add_argument("--nodes", required=True, help="comma-separated SLURM node names")
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--cpus-per-node", type=int, default=0, help="minimum CPUs per node (0: any)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all nodes")
    parser.add_argument("--probe", action="store_true", help="run one task on every node afterwards")
    parser.add_argument("--json", type=Path, help="write the node states (and probe results) here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        expect = Expectation(tuple(n for n in args.nodes.split(",") if n), args.gpus_per_node, args.cpus_per_node)
    except ValueError as exc:
        print(f"[ray] bad arguments: {exc}", file=sys.stderr)
        return 2
    import ray

    start = time.monotonic()
    try:
        connect(args.address, args.timeout)
        nodes = wait_for_nodes(ray.nodes, expect, max(0.0, args.timeout - (time.monotonic() - start)),
                               report=lambda msg: print(msg, flush=True))
    except ClusterNotReady as exc:
        print(f"[ray] ERROR: {exc}", file=sys.stderr, flush=True)
        return EXIT_NOT_READY
    summary = ", ".join(f"{n.name}: {n.cpus:g} CPU {n.gpus:g} GPU" for n in nodes.values())
    print(f"[ray] cluster ready after {time.monotonic() - start:.1f} s: {len(nodes)} node(s) ({summary})", flush=True)
    out = {"nodes": {name: asdict(state) for name, state in nodes.items()}}
    code = 0
    if args.probe:
        try:
            out["probe"] = probe(nodes, timeout_s=args.timeout)
            for name, res in out["probe"].items():
                print(f"[ray] probe: task for {name} ran on SLURM node {res['slurm_node']} "
                      f"(Ray node {res['node_id'][:12]}, pid {res['pid']})", flush=True)
        except (ClusterNotReady, ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as exc:
            print(f"[ray] ERROR: probe failed: {exc}", file=sys.stderr, flush=True)
            code = EXIT_PROBE_FAILED
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(out, indent=2))
        tmp.replace(args.json)
    ray.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
