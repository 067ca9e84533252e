"""verl's own pre-flight check (`verl.utils.config.validate_config`), run in a helper process.

Importing verl costs ~4 s (torch, tensordict, transformers). `VerlCheck.start(cfg)` returns the
verdict cached for this exact config (and verl version), or launches a helper that imports verl
on the second core while this process runs its own checks; `result()` returns verl's verdict.
verl's prints and warnings stay in the helper. `verl_problem(cfg)` is the same check in this
process.

    python -m grail_megatron.config.verl_check   # the helper: config YAML on stdin, JSON verdict on stdout
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any


def verl_problem(cfg: Any) -> str | None:
    """None when verl's validate_config accepts `cfg` (on a copy it may mutate), else its message."""
    from omegaconf import OmegaConf

    from grail_megatron.config.planner import needs_reference_policy

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        from verl.trainer.ppo.utils import need_critic
        from verl.utils.config import validate_config

        copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        try:
            validate_config(config=copy, use_reference_policy=needs_reference_policy(copy),
                            use_critic=need_critic(copy))
        except (AssertionError, ValueError, TypeError) as exc:
            return f"verl's validate_config rejected the config: {exc}"
    return None


class VerlCheck:
    """verl's verdict on one config: from the cache, or from a helper process that imports verl
    while this process runs its own checks (`start(cfg)`, then `result()` or `cancel()`)."""

    def __init__(self, cfg: Any, key: str | None, cached: dict | None, proc: subprocess.Popen | None):
        self.cfg, self.key, self.cached, self.proc = cfg, key, cached, proc

    @classmethod
    def start(cls, cfg: Any) -> "VerlCheck":
        key = cache_key(cfg)
        cached = read_cache(key)
        if cached is not None:
            return cls(cfg, key, cached, None)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.Popen([sys.executable, "-m", "grail_megatron.config.verl_check"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        return cls(cfg, key, None, proc)

    def result(self, timeout: float = 300) -> str | None:
        """None when verl accepts the config, else its message; RuntimeError when the helper broke."""
        if self.cached is not None:
            return self.cached["problem"]
        problem = self._ask(timeout)
        write_cache(self.key, {"problem": problem})
        return problem

    def _ask(self, timeout: float) -> str | None:
        from omegaconf import OmegaConf

        out, err = self.proc.communicate(OmegaConf.to_yaml(self.cfg, resolve=False), timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if self.proc.returncode != 0 or not lines:
            tail = "\n".join(err.strip().splitlines()[-5:])
            raise RuntimeError(f"the verl validation helper failed (exit {self.proc.returncode}): {tail}")
        return json.loads(lines[-1])["problem"]

    def cancel(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "grail-megatron" / "verl-check"


# What verl 0.9.1's validate_config reads (verl/utils/config.py): the verdict depends on these
# keys only, so changing data files, steps, loggers or paths does not need verl again.
_ROLLOUT = "actor_rollout_ref.rollout"
VERDICT_KEYS = ("actor_rollout_ref.actor", "actor_rollout_ref.model", "actor_rollout_ref.ref", f"{_ROLLOUT}.n",
                f"{_ROLLOUT}.log_prob_micro_batch_size", f"{_ROLLOUT}.log_prob_micro_batch_size_per_gpu",
                f"{_ROLLOUT}.val_kwargs", f"{_ROLLOUT}.temperature", f"{_ROLLOUT}.name", "algorithm", "critic",
                "trainer.nnodes", "trainer.n_gpus_per_node", "data.train_batch_size", "data.val_batch_size")


def cache_key(cfg: Any) -> str | None:
    """sha256 of verl's version and the resolved keys verl's validator reads; None when they do not resolve."""
    from importlib.metadata import version

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        parts = {key: OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
                 for key in VERDICT_KEYS for node in [OmegaConf.select(cfg, key, default=None)]}
    except OmegaConfBaseException:
        return None
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(f"verl {version('verl')}\n{text}".encode()).hexdigest()


def read_cache(key: str | None) -> dict | None:
    if key is None or os.environ.get("GRAIL_NO_CHECK_CACHE", "0") not in ("", "0"):
        return None
    try:
        return json.loads((cache_dir() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None


def write_cache(key: str | None, verdict: dict) -> None:
    if key is None:
        return
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        tmp = cache_dir() / f".{key}.{os.getpid()}"
        tmp.write_text(json.dumps(verdict))
        os.replace(tmp, cache_dir() / f"{key}.json")
    except OSError:
        pass  # a read-only home: no cache, same verdicts


def _serve() -> int:
    from omegaconf import OmegaConf

    real_stdout = sys.stdout
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        import verl.utils.config  # noqa: F401  (the slow part, before the config arrives)
    text = sys.stdin.read()
    if not text.strip():
        return 0  # cancelled
    problem = verl_problem(OmegaConf.create(text))
    real_stdout.write(json.dumps({"problem": problem}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
