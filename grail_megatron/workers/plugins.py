"""What verl imports in every process of a grail-megatron run (`VERL_USE_EXTERNAL_MODULES`).

`grail-megatron train` puts this module's name in `VERL_USE_EXTERNAL_MODULES` (and in the Ray
runtime environment, so every Ray worker has it): `import verl` then imports it, in the driver,
the TaskRunner, the training workers, the rollout servers and the reward workers alike. It
registers, through verl's and mbridge's own registries:

- the `cpu` platform (`verl.plugin.platform.PlatformRegistry`; used only with VERL_PLATFORM=cpu);
- the `hf` rollout (`RolloutReplicaRegistry`; used only with actor_rollout_ref.rollout.name=hf).

It stays light (no megatron import): every Ray process imports verl. What only the processes that
build a Megatron engine need (grail_megatron.megatron.mbridge_compat, and on CPU
grail_megatron.megatron.cpu_support) is applied by our workers (grail_megatron/workers/trainer.py).
The trainer mode is registered by the Ray worker setup hook (`grail_megatron.workers.
setup_worker_process`): it imports verl's trainer, too heavy to import inside `import verl`.
"""

from __future__ import annotations

import os

CPU_PLATFORM_ENV = "VERL_PLATFORM"
MODULE = __name__


def on_cpu_platform() -> bool:
    return os.environ.get(CPU_PLATFORM_ENV, "").strip().lower() == "cpu"


def register_all() -> None:
    from grail_megatron.workers.hf_rollout import register_hf_rollout
    from grail_megatron.workers.platform_cpu import register_cpu_platform

    register_cpu_platform()
    register_hf_rollout()


register_all()
