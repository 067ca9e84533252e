"""Config composition (Hydra over verl 0.9.1's config tree) and the parallelism/memory planner."""

from grail_megatron.config.compose import CONFIG_DIR, ConfigError, compose, config_names, preset_options

__all__ = ["CONFIG_DIR", "ConfigError", "compose", "config_names", "preset_options"]
