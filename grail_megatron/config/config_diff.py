"""The keys of a composed config that differ from verl 0.9.1's own defaults (what `--dry-run` shows).

verl's defaults are its `ppo_trainer` config with `model_engine=megatron`, composed from verl's
config folder alone; the comparison is on unresolved values, so `${...}` shows as written.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

MISSING_TEXT = "(absent in verl)"


def verl_defaults() -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from grail_megatron.config.compose import verl_config_dir

    with initialize_config_dir(config_dir=str(verl_config_dir()), version_base=None, job_name="verl_defaults"):
        return hydra_compose(config_name="ppo_trainer", overrides=["model_engine=megatron"])


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value}; lists are leaves."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def differing_keys(cfg: DictConfig, base: DictConfig | None = None) -> list[tuple[str, Any, Any]]:
    """(key, verl's default, ours) for every leaf that differs, in key order."""
    base = verl_defaults() if base is None else base
    ours = flatten(OmegaConf.to_container(cfg, resolve=False))
    theirs = flatten(OmegaConf.to_container(base, resolve=False))
    return [(key, theirs.get(key, MISSING_TEXT), value) for key, value in sorted(ours.items())
            if theirs.get(key, MISSING_TEXT) != value]


def render_differences(rows: list[tuple[str, Any, Any]]) -> str:
    lines = [f"# {len(rows)} key(s) differ from verl 0.9.1's defaults (verl's -> ours; --print-config shows all)"]
    lines += [f"{key}: {default!r} -> {value!r}" for key, default, value in rows]
    return "\n".join(lines)
