"""verl's own pre-flight check (`verl.utils.config.validate_config`), run in a helper process.

Importing verl costs ~4 s of CPU (torch, tensordict, transformers, Ray), more than everything else
`train --dry-run` does. So `VerlCheck.begin(config_name, overrides)`, the first thing `train`
does, launches a helper that imports verl on the second core while this process composes the
config and runs its own checks; `result(cfg)` returns verl's verdict: the one cached for this
exact config (and verl version), in which case the helper is stopped, or the helper's. A
command line whose verdict was cached last time starts no helper up front (`begin` remembers
which verdict each command line got), and one started late is the same check, only later.
verl's prints and warnings stay in the helper. `verl_problem(cfg)` is the same check in this
process.

    python -m grail_megatron.config.verl_check   # the helper: a pickled config on stdin, a JSON verdict on stdout
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def verl_problem(cfg: Any, copy: bool = True) -> str | None:
    """None when verl's validate_config accepts `cfg`, else its message; it runs on a copy it may
    mutate (copy=False: on `cfg` itself, a copy already)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        from verl.trainer.ppo.utils import need_critic, need_reference_policy
        from verl.utils.config import validate_config

        cfg = validation_copy(cfg) if copy else cfg
        try:
            validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
        except (AssertionError, ValueError, TypeError) as exc:
            return f"verl's validate_config rejected the config: {exc}"
    return None


def validation_copy(cfg: Any):
    """What verl's validator is given: a plain (non-struct) copy of the unresolved config."""
    from omegaconf import OmegaConf

    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))


def _spawn() -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.Popen([sys.executable, "-m", "grail_megatron.config.verl_check"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


class VerlCheck:
    """verl's verdict on one config: from the cache, or from a helper process that imports verl
    while this process composes and runs its own checks (`begin(...)`, then `result(cfg)` or
    `cancel()`)."""

    def __init__(self, proc: subprocess.Popen | None = None, hint: str | None = None):
        self.proc, self.hint = proc, hint

    @classmethod
    def begin(cls, config_name: str, overrides: Sequence[str]) -> "VerlCheck":
        """Before composing: launch the helper now, unless this command line's verdict is cached."""
        hint = hint_key(config_name, overrides)
        return cls(None if verdict_known(hint) else _spawn(), hint)

    def result(self, cfg: Any, timeout: float = 300) -> str | None:
        """None when verl accepts `cfg`, else its message; RuntimeError when the helper broke."""
        key = cache_key(cfg)
        cached = read_cache(key)
        if cached is not None:
            self.cancel()
            problem = cached["problem"]
        else:
            if self.proc is None:
                self.proc = _spawn()
            problem = self._ask(cfg, timeout)
            write_cache(key, {"problem": problem})
        write_hint(self.hint, key)
        return problem

    def _ask(self, cfg: Any, timeout: float) -> str | None:
        try:
            out, err = self.proc.communicate(pickle.dumps(validation_copy(cfg)), timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            raise RuntimeError(f"the verl validation helper gave no verdict within {timeout:g} s") from None
        lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("{")]
        if self.proc.returncode != 0 or not lines:
            tail = "\n".join(err.decode(errors="replace").strip().splitlines()[-5:])
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


def hint_key(config_name: str, overrides: Sequence[str]) -> str:
    """A command line (config name, overrides, config folder), to remember which verdict it got."""
    from grail_megatron.config.compose import CONFIG_DIR

    text = json.dumps([str(CONFIG_DIR), config_name, list(overrides)])
    return hashlib.sha256(text.encode()).hexdigest()


def _hint_path(hint: str) -> Path:
    return cache_dir() / "command-lines" / hint


def verdict_known(hint: str | None) -> bool:
    """Whether this command line's verdict was cached last time (then no helper is started up front;
    `result` still looks the verdict up by the composed config, and starts the helper if it must)."""
    if hint is None:
        return False
    try:
        key = _hint_path(hint).read_text().strip()
    except OSError:
        return False
    return read_cache(key) is not None


def write_hint(hint: str | None, key: str | None) -> None:
    if hint is None or key is None:
        return
    try:
        path = _hint_path(hint)
        if path.is_file() and path.read_text().strip() == key:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{hint}.{os.getpid()}")
        tmp.write_text(key)
        os.replace(tmp, path)
    except OSError:
        pass


def _serve() -> int:
    """The helper: import what verl's validator needs right away, then validate the config sent."""
    gc.disable()  # a short-lived process that only imports: the collector would add ~10% to the import
    real_stdout = sys.stdout
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        import verl.trainer.ppo.utils  # noqa: F401  (the slow part, before the config arrives)
        import verl.utils.config  # noqa: F401
    data = sys.stdin.buffer.read()
    if not data:
        return 0  # cancelled
    problem = verl_problem(pickle.loads(data), copy=False)  # a validation_copy() already
    real_stdout.write(json.dumps({"problem": problem}) + "\n")
    real_stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the verdict is out: skip tearing torch, Ray and the rest down (~1.5 s)


if __name__ == "__main__":
    sys.exit(_serve())
