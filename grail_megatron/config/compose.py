"""Compose the run config: verl 0.9.1's `ppo_trainer` (model_engine=megatron) + our `configs/`.

verl's YAML is never copied: `configs/grpo_grail.yaml` lists `ppo_trainer` in its defaults and
adds verl's config package to the Hydra searchpath. `compose()` works from any working
directory and can be called any number of times in one process (each call uses its own
Hydra context, so no global Hydra state is left behind).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# The repository's configs/ (the package is installed editable); GRAIL_CONFIG_DIR points
# elsewhere, e.g. a copy baked into a container image.
CONFIG_DIR = Path(os.environ.get("GRAIL_CONFIG_DIR") or Path(__file__).resolve().parents[2] / "configs")

# Preset groups we ship: group name -> what it selects (for help texts and error messages).
PRESET_GROUPS = {
    "model_preset": "model (HF id, architecture facts, actor/ref/rollout layout)",
    "dataset": "dataset (parquet files from `grail-megatron prepare-data`)",
    "cluster": "cluster (nodes, GPUs per node, GPU memory)",
    "kl": "KL setting (off | low_var_kl)",
}


class ConfigError(ValueError):
    """A bad override or preset, reported with the key and the allowed values."""


def config_names() -> list[str]:
    """Primary configs a user can pass as `config_name` (`grpo_grail`, `grpo_grail_kl`)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_options(group: str) -> list[str]:
    """The shipped options of a preset group, e.g. `preset_options("dataset")`."""
    if group not in PRESET_GROUPS:
        raise ConfigError(f"unknown preset group {group!r}; allowed: {', '.join(PRESET_GROUPS)}")
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose(overrides: Sequence[str] = (), config_name: str = "grpo_grail") -> DictConfig:
    """Return the fully composed (unresolved) config for `config_name` with Hydra `overrides`.

    Raises ConfigError naming the offending key or preset and the allowed values.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    overrides = list(overrides)
    if config_name not in config_names():
        raise ConfigError(f"unknown config_name {config_name!r}; allowed: {', '.join(config_names())}")
    _check_preset_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None, job_name="grail_megatron"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides + _searchpath_override(overrides))
    except HydraException as exc:
        raise ConfigError(_explain_hydra_error(exc, config_name)) from exc
    return cfg


def verl_config_dir() -> Path:
    """verl's config folder, found without importing verl (importing it costs ~4 s: torch)."""
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("verl is not installed in this Python; install the project (make setup)")
    return Path(list(spec.submodule_search_locations)[0]) / "trainer" / "config"


def _searchpath_override(overrides: list[str]) -> list[str]:
    """The primary config's `pkg://verl.trainer.config` as a file path, unless the user set one."""
    if any(item.lstrip("+~").startswith("hydra.searchpath") for item in overrides):
        return []
    return [f"hydra.searchpath=[file://{verl_config_dir()}]"]


def _check_preset_overrides(overrides: list[str]) -> None:
    """Reject a misspelled preset before Hydra does, listing the shipped options."""
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in PRESET_GROUPS:
            continue
        allowed = preset_options(key)
        if value not in allowed:
            hint = difflib.get_close_matches(value, allowed, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"{key}={value!r} is not a shipped {PRESET_GROUPS[key]} preset{did_you_mean}; "
                f"allowed values for {key}: {', '.join(allowed)}"
            )


def _explain_hydra_error(exc: Exception, config_name: str) -> str:
    """Turn Hydra's error into one that names the key and the keys allowed at that level."""
    message = str(exc)
    cause = exc.__cause__ or exc.__context__
    key = getattr(cause, "full_key", None)
    if key:
        parent, _, leaf = str(key).rpartition(".")
        siblings = _keys_at(parent, config_name)
        if siblings is not None and leaf not in siblings:
            hint = difflib.get_close_matches(leaf, siblings, n=3)
            did_you_mean = f"; did you mean {', '.join(repr(h) for h in hint)}?" if hint else ""
            where = parent or "<top level>"
            return (
                f"unknown config key {key!r}{did_you_mean} Keys allowed under {where}: "
                f"{', '.join(sorted(siblings))}. (To add a new key on purpose use '+{key}=...')"
            )
    return message


def _keys_at(parent: str, config_name: str) -> list[str] | None:
    """Keys of the node `parent` in the default composition (None when it is not a node)."""
    try:
        base = compose((), config_name)
    except ConfigError:
        return None
    node = OmegaConf.select(base, parent) if parent else base
    if not isinstance(node, DictConfig):
        return None
    return [str(k) for k in node.keys()]
