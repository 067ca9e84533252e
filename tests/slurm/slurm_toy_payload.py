"""A trainer-shaped payload that follows the preemption protocol, for launcher tests.

    python slurm_toy_payload.py CKPT_DIR --steps N [--step-seconds S] [--fail]

Resumes from CKPT_DIR/step (written atomically), prints `step K`, saves every step; on
SIGUSR1/SIGTERM it finishes the current step, saves and exits 75. `--fail` exits 3 at once.
"""
import argparse
import os
import signal
import sys
import time
from pathlib import Path

stop = []
signal.signal(signal.SIGUSR1, lambda s, f: stop.append(s))
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))

parser = argparse.ArgumentParser()
parser.add_argument("ckpt_dir", type=Path)
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--step-seconds", type=float, default=0.5)
parser.add_argument("--fail", action="store_true")
args = parser.parse_args()
if args.fail:
    print("toy payload: failing on purpose", flush=True)
    sys.exit(3)
args.ckpt_dir.mkdir(parents=True, exist_ok=True)
ckpt = args.ckpt_dir / "step"
start = int(ckpt.read_text()) if ckpt.exists() else 0
print(f"toy payload: resuming after step {start}", flush=True)
for step in range(start + 1, args.steps + 1):
    time.sleep(args.step_seconds)
    tmp = ckpt.with_suffix(".tmp")
    tmp.write_text(str(step))
    os.replace(tmp, ckpt)
    print(f"step {step}", flush=True)
    if stop:
        print(f"toy payload: signal {stop[0]} -> checkpoint at step {step}, exit 75", flush=True)
        sys.exit(75)
print("toy payload: done", flush=True)
