"""A scorer run as ``nobody``, driven line by line: the ``userns`` side of the attack tests.

Started by ``test_rewards_attacks.py`` through ``nonroot_launcher.py`` (so it runs as
``nobody`` and its pool and sympy worker take the ``userns`` path), with argv[1] the JSON of
a ``SandboxConfig``. It prints one JSON line once ready (``{"mode", "zygotes"}``, or
``{"unavailable": message}`` where no sandbox can start), then answers one JSON line per
request line:

* ``{"op": "mbpp", "solution_str", "ground_truth"}``: ``compute_score`` on an MBPP row;
* ``{"op": "math", "solution_str", "ground_truth"}``: ``compute_score`` on a MATH row;
* ``{"op": "run", "programs"}``: ``SandboxPool.run`` (programs run whole);
* ``{"op": "sympy_pids"}``: the pids of the sympy worker processes (their relays);
* ``{"op": "close_math"}``: close the sympy workers and wait for their relays;
* ``{"op": "exit"}``.

The host side (root) checks files, IPC objects and processes between requests.
"""
from __future__ import annotations

import json
import sys


def main() -> None:
    from grail_megatron.rewards import SandboxConfig, SandboxPool, SandboxUnavailable, compute_score
    from grail_megatron.rewards import sympy_worker

    try:
        pool = SandboxPool(workers=1, config=SandboxConfig(**json.loads(sys.argv[1])))
    except SandboxUnavailable as exc:
        print(json.dumps({"unavailable": str(exc)}), flush=True)
        return
    checker = sympy_worker.default_checker()
    checker.warmup()
    print(json.dumps({"mode": pool.mode, "zygotes": [z.proc.pid for z in pool._all]}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op in ("mbpp", "math"):
            reply = compute_score(f"grail_{op}", request["solution_str"], request["ground_truth"], sandbox=pool)
        elif op == "run":
            reply = pool.run(request["programs"])
        elif op == "sympy_pids":
            reply = [worker.proc.pid for workers in checker._idle.values() for worker in workers]
        elif op == "close_math":
            checker.close()
            for proc in list(sympy_worker._DYING):
                proc.wait()
            reply = "closed"
        elif op == "exit":
            break
        else:
            reply = {"error": f"unknown op {op!r}"}
        print(json.dumps(reply), flush=True)
    pool.close()


if __name__ == "__main__":
    main()
