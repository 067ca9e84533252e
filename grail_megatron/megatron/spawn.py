"""A pool of torch.distributed ranks that stay up and run functions on request.

Starting a rank costs ~10 s of CPU (importing torch, megatron-core, transformers), so tests
and tools that need several distributed runs start one pool and send it work:

    with RankPool(world_size=2) as pool:
        results = pool.run(my_module.fn, arg1, arg2)   # fn(*args) on every rank -> [r0, r1]

`fn` must be importable by module path (module-level function). Each rank has the process
group (gloo on CPU) initialised, `OMP_NUM_THREADS=1`, and nothing else: `fn` calls
`parallel.initialize(tp, pp)` itself, and may call it again with other sizes later.
A failure on any rank raises `RankError` in the caller with that rank's traceback.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable

import torch.multiprocessing as mp


class RankError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bytes(value) -> bytes:
    """Results travel as bytes: shared-memory tensors would die with the rank that made them."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes):
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank: int, world_size: int, port: int, tasks, results, cpu_support: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    if cpu_support:
        from grail_megatron.megatron.cpu_support import enable_cpu_support

        enable_cpu_support()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, _to_bytes(fn(*args, **kwargs))))
        except BaseException:  # noqa: BLE001 - reported to the caller with the traceback
            results.put((rank, False, traceback.format_exc()))
    torch.distributed.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int, cpu_support: bool = True, timeout: float = 300.0):
        self.world_size = world_size
        self.cpu_support = cpu_support
        self.timeout = timeout
        self._procs = []

    def start(self) -> RankPool:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        for rank in range(self.world_size):
            p = ctx.Process(target=_worker, daemon=True, args=(
                rank, self.world_size, port, self._tasks[rank], self._results, self.cpu_support))
            p.start()
            self._procs.append(p)
        return self

    def run(self, fn: Callable, *args, **kwargs) -> list:
        """Run fn(*args, **kwargs) on every rank; return the per-rank results in rank order."""
        for q in self._tasks:
            q.put((fn, args, kwargs))
        out = [None] * self.world_size
        failures = []
        for _ in range(self.world_size):
            # once a rank failed, the others may wait forever in a collective: do not wait long
            timeout = 20.0 if failures else self.timeout
            try:
                rank, ok, value = self._results.get(timeout=timeout)
            except queue.Empty:
                self.close(force=True)
                failures.append(f"no answer from the other ranks within {timeout:.0f} s "
                                "(pool stopped)")
                break
            if ok:
                out[rank] = _from_bytes(value)
            else:
                failures.append(f"--- rank {rank} ---\n{value}")
        if failures:
            raise RankError(f"{fn.__name__} failed:\n" + "\n".join(failures))
        return out

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=30)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []

    def __enter__(self) -> RankPool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close(force=exc[0] is not None)
