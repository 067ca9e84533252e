"""Multi-node launch support: Ray bring-up on SLURM allocations and a throw-away local SLURM.

- `ray_cluster`: wait until every SLURM node (and its GPUs/CPUs) has joined the job's Ray
  cluster, then prove it by running a task on each node (`python -m grail_megatron.launch.ray_cluster`).
- `netif`: default network interface for NCCL/GLOO sockets.
- `minicluster`: munge + slurmctld + N emulated `slurmd -N` on 127.0.0.1 in a private
  directory, for tests and for trying `scripts/slurm/` on one machine.

Nothing here imports Ray or torch at module import time.
"""
