"""verl's own trainer vs the local loop on one config: start-up and seconds per step by stage.

    .venv/bin/python benchmarks/verl_path.py [--steps 3] [--prompts 8] [--n 4] [--work DIR]

One run prepares the tiny sums task (`grail_megatron.local.recipes.prepare_sums_run`: data,
locally trained tokenizer, random-init tiny Qwen2 with a vocabulary of 296 rows so that it
divides TP, 20 warm-start steps) and trains it twice with the same overrides
(`sums_overrides`: same model, data, batch, TP=2, `--steps` steps, `trainer.save_freq` at the
last step, no validation, `trainer.logger=[console,tensorboard]`), each as a fresh process the
way a user starts it:

- local: `grail-megatron train --local <overrides>` (launcher -> torchrun -> 2 gloo ranks);
- verl:  `grail-megatron train <overrides>` (verl 0.9.1's `run_ppo`, Ray, TaskRunnerV1, verl's
  Megatron engine on 2 gloo ranks, the HF rollout server, verl's weight sync). Where that CLI
  still refuses a CPU run ("no CUDA GPU", exit 3) the benchmark falls back to composing the
  config and calling `grail_megatron.workers.run_verl` in a `python -c` child (no preflight:
  it then skips the validation step the local path runs) and says so in the table's heading.

Both paths log through verl's `Tracking`; the figures are read from each run's tensorboard
events (`TENSORBOARD_DIR`, one folder per path), the console's `step:N - ...` lines being the
fallback for verl. Printed, asserting nothing:

- start-up, two rows: "first step begun" = wall time of the step-1 tensorboard event minus
  `timing_s/step` at step 1 minus the moment the benchmark started the process (it includes
  interpreter start, imports, config composition and checks, process/Ray start-up, model
  build and the first weight sync; it excludes the metric computation between the end of
  step 1's timer and the log call, well under a second); "first metrics logged" = wall time of
  the step-1 event minus the process start.
- per timing key (verl's names: gen, reward, old_log_prob, ref, adv, update_actor,
  update_weights, save_checkpoint, step): step 1 (warm-up: first Megatron forward, first
  generate) and the mean of steps 2..N where the key is reported, for each path, with the
  local/verl ratio. "-": the path does not report the key. Keys outside that list that a path
  reports are listed under the table.
- "step - save_checkpoint": verl's `step` timer includes the checkpoint, the local loop's does
  not; this row compares like with like. "step - named keys": the part of `step` no key names.
- "whole process": process start to exit (shutdown of Ray / torchrun included).

Differences between the paths that the keys hide (read from the code, verl 0.9.1's v1 trainer):
- the local loop's `gen` is generate + rewards + GRPO advantages + the broadcast of the batch to
  the other rank; it reports no `reward` and no `adv`. verl's `gen` is the trainer's wait on its
  replay buffer while the agent loop generates and scores (the reward-loop workers score, so
  verl reports no `reward` either); the buffer polls every 2.0 s (`ReplayBuffer.poll_interval`,
  not a config key), so on this tiny model verl's `gen` is a multiple of ~2 s.
- verl's `step` includes `save_checkpoint` and, at step 1, about 10 s that no key names
  (untimed calls such as `prepare_step`, which reads the first batch and hands it to the agent
  loop; not broken down here): the "step - named keys" row.
- `ref` appears only with the KL loss (off here), on both paths.

Timings are wall-clock on whatever else the machine runs: on a shared 2-core machine they are
noisy (the load average is printed); compare the ratios of one run, not figures across runs.
The default (3 steps, 8 prompts x 4 samples) took 4 minutes on 2 cores at load 3-10 (6 minutes
at load 12), most of it verl's start-up. Each child runs with RAY_AUTH_MODE=disabled, RAY_USAGE_STATS_ENABLED=0,
OMP_NUM_THREADS=1 and HF_HUB_OFFLINE=1; a child past `--timeout` is sent SIGTERM (checkpoint
and exit), then its process tree is killed by PID.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("gen", "reward", "old_log_prob", "ref", "adv", "update_actor", "update_weights", "save_checkpoint", "step")
CHILD_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
             "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
# verl's console backend: "step:1 - key:value - key:value ..."
CONSOLE_STEP = re.compile(r"step:(\d+) - (.*)$")
# the fallback when `grail-megatron train cluster=cpu` still refuses CPU (the CLI predates cluster=cpu)
VERL_BY_PYTHON = ("import sys; from grail_megatron.config.compose import compose; "
                  "from grail_megatron.workers import export_runtime_env, run_verl; "
                  "cfg = compose(sys.argv[1:]); export_runtime_env(cfg); run_verl(cfg)")


@dataclass
class PathRun:
    name: str
    how: str = ""
    exit_code: int | None = None
    started: float = 0.0                      # time.time() just before the process was started
    wall_s: float = 0.0
    first_console_metrics: float | None = None  # time.time() the first metrics line reached our pipe
    timings: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> key -> seconds
    logged_at: dict[int, float] = field(default_factory=dict)  # step -> event wall time
    source: str = "-"
    log: Path | None = None


def _descendants(pid: int) -> list[int]:
    """PIDs below `pid` (from /proc), deepest last; the local launcher puts torchrun in its own session."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM our child (both launchers checkpoint and exit on it), then SIGKILL what is left, by PID."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_child(run: PathRun, argv: list[str], env: dict[str, str], timeout_s: float, log: Path,
              metrics_line: re.Pattern) -> str:
    """Run one path to the end; the console goes to `log`; returns the console text."""
    run.log = log
    lines: list[str] = []
    run.started = time.time()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)

    def pump():
        with open(log, "w") as out:
            for line in proc.stdout:
                if run.first_console_metrics is None and metrics_line.search(line):
                    run.first_console_metrics = time.time()
                lines.append(line)
                out.write(line)
                out.flush()

    seen: dict[int, str] = {}  # every process the child started: pid -> /proc start time

    def watch():
        while proc.poll() is None:
            for pid in _descendants(proc.pid):
                seen.setdefault(pid, _start_time(pid))
            time.sleep(2)

    reader = threading.Thread(target=pump, daemon=True)
    watcher = threading.Thread(target=watch, daemon=True)
    reader.start()
    watcher.start()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        print(f"  {run.name}: past --timeout {timeout_s:.0f} s, stopping it", flush=True)
        _kill_tree(proc)
    run.wall_s = time.time() - run.started
    run.exit_code = proc.returncode
    reader.join(30)
    watcher.join(10)
    # Ray's processes normally go with `ray.shutdown()`; remove what is left of ours (matched by
    # PID and start time, so a recycled PID is never hit)
    time.sleep(10)
    leftovers = [pid for pid, started in seen.items() if started and _start_time(pid) == started]
    names = []
    for pid in leftovers:
        names.append(_name(pid))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leftovers:
        print(f"  {run.name}: killed {len(leftovers)} leftover process(es) of this run: {', '.join(names)}",
              flush=True)
    return "".join(lines)


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:80].strip()
    except OSError:
        return str(pid)


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def read_tensorboard(run: PathRun, tb_dir: Path) -> bool:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tb_dir.is_dir() or not any(tb_dir.rglob("events.out.tfevents.*")):
        return False
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags().get("scalars", []) if t.startswith("timing_s/")]
    for tag in tags:
        for e in events.Scalars(tag):
            run.timings.setdefault(e.step, {})[tag.removeprefix("timing_s/")] = e.value
            run.logged_at[e.step] = min(run.logged_at.get(e.step, e.wall_time), e.wall_time)
    run.source = "tensorboard"
    return bool(run.timings)


def read_console(run: PathRun, text: str) -> bool:
    """verl's console line `step:N - timing_s/gen:1.23 - ...` (no event wall times: start-up from the pipe)."""
    for line in text.splitlines():
        m = CONSOLE_STEP.search(line)
        if not m:
            continue
        step = int(m.group(1))
        for item in m.group(2).split(" - "):
            key, _, value = item.partition(":")
            if key.startswith("timing_s/"):
                try:
                    run.timings.setdefault(step, {})[key.removeprefix("timing_s/")] = float(value)
                except ValueError:
                    pass
    run.source = "console"
    return bool(run.timings)


def startup(run: PathRun) -> tuple[float | None, float | None]:
    """(process start -> first step begun, process start -> first metrics logged), seconds."""
    first = min(run.timings) if run.timings else None
    if first is None:
        return None, None
    logged = run.logged_at.get(first)
    if logged is None:  # console fallback: the moment the line reached our pipe
        logged = run.first_console_metrics
    if logged is None:
        return None, None
    logged_s = logged - run.started
    step_s = run.timings[first].get("step")
    return (logged_s - step_s if step_s is not None else None), logged_s


def per_key(run: PathRun, key: str) -> tuple[float | None, float | None]:
    """(value at the first step, mean over the later steps that report it)."""
    if not run.timings:
        return None, None
    steps = sorted(run.timings)
    first = run.timings[steps[0]].get(key)
    later = [run.timings[s][key] for s in steps[1:] if key in run.timings[s]]
    return first, (sum(later) / len(later) if later else None)


def step_minus(run: PathRun, inside: tuple[str, ...]) -> tuple[float | None, float | None]:
    """`step` minus the keys timed inside it (first step, mean of the later ones)."""
    def value(s):
        t = run.timings[s]
        if "step" not in t:
            return None
        return t["step"] - sum(t.get(k, 0.0) for k in inside)

    if not run.timings:
        return None, None
    steps = sorted(run.timings)
    later = [v for v in (value(s) for s in steps[1:]) if v is not None]
    return value(steps[0]), (sum(later) / len(later) if later else None)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "-"
    return f"{a / b:.2f}x"


def print_table(local: PathRun, verl: PathRun, steps: int) -> None:
    later = "2" if steps == 2 else f"2-{steps}"
    header = ("seconds", "local step 1", "verl step 1", "ratio", f"local {later}", f"verl {later}", "ratio")
    rows = []
    (l_begun, l_logged), (v_begun, v_logged) = startup(local), startup(verl)
    rows.append(("start-up: to first step begun", _fmt(l_begun), _fmt(v_begun), _ratio(l_begun, v_begun), "", "", ""))
    rows.append(("start-up: to first metrics logged", _fmt(l_logged), _fmt(v_logged), _ratio(l_logged, v_logged),
                 "", "", ""))
    for key in KEYS:
        l1, l2 = per_key(local, key)
        v1, v2 = per_key(verl, key)
        rows.append((f"timing_s/{key}", _fmt(l1), _fmt(v1), _ratio(l1, v1), _fmt(l2), _fmt(v2), _ratio(l2, v2)))
    # the local loop's `step` timer ends before the checkpoint, verl's includes it
    l1, l2 = step_minus(local, ())
    v1, v2 = step_minus(verl, ("save_checkpoint",))
    rows.append(("step - save_checkpoint", _fmt(l1), _fmt(v1), _ratio(l1, v1), _fmt(l2), _fmt(v2), _ratio(l2, v2)))
    named = tuple(k for k in KEYS if k not in ("step", "save_checkpoint"))
    l1, l2 = step_minus(local, named)
    v1, v2 = step_minus(verl, (*named, "save_checkpoint"))
    rows.append(("step - named keys (untimed)", _fmt(l1), _fmt(v1), _ratio(l1, v1), _fmt(l2), _fmt(v2),
                 _ratio(l2, v2)))
    rows.append(("whole process (wall)", _fmt(local.wall_s), _fmt(verl.wall_s), _ratio(local.wall_s, verl.wall_s),
                 "", "", ""))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for i, row in enumerate([header, tuple("-" * w for w in widths), *rows]):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        print("  ".join(cells).rstrip())
    for run in (local, verl):
        others = sorted({k for t in run.timings.values() for k in t} - set(KEYS))
        if others:
            print(f"{run.name} also reports: " + ", ".join(f"timing_s/{k}" for k in others))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3,
                        help="GRPO steps per path (default 3; >= 2 for the later-step mean)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (data.train_batch_size, default 8)")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (actor_rollout_ref.rollout.n, default 4)")
    parser.add_argument("--tp", type=int, default=2, help="tensor parallel size (default 2)")
    parser.add_argument("--work", default="outputs/bench_verl_path", help="working folder (recreated)")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds per path before it is stopped (default 600)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    from grail_megatron.local.recipes import prepare_sums_run, sums_overrides
    from grail_megatron.local.warm_start import WarmStartSettings

    work = (REPO / args.work).resolve() if not Path(args.work).is_absolute() else Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    print(f"preparing the sums task in {work} ...", flush=True)
    prep = prepare_sums_run(work / "task", vocab_size=296, warm=WarmStartSettings(steps=20))
    print(f"  done ({time.perf_counter() - began:.0f} s)", flush=True)

    python = sys.executable
    cli = [python, "-m", "grail_megatron.cli", "train"]
    runs = {}
    for name in ("local", "verl"):
        out = work / name
        out.mkdir()
        overrides = sums_overrides(prep, out / "checkpoints", steps=args.steps, tp=args.tp, save_freq=args.steps,
                                   prompts_per_step=args.prompts, n=args.n)
        env = {**os.environ, **CHILD_ENV, "TENSORBOARD_DIR": str(out / "tensorboard")}
        env.pop("RAY_ADDRESS", None)  # a cluster of its own, never someone else's
        run = PathRun(name)
        print(f"{name}: {args.steps} steps, {args.prompts} prompts x {args.n}, TP={args.tp} ...", flush=True)
        if name == "local":
            run.how = "grail-megatron train --local"
            text = run_child(run, [*cli, "--local", *overrides], env, args.timeout, out / "console.log",
                             re.compile(r"^\s+1\s+[-\d.]"))
        else:
            run.how = "grail-megatron train"
            text = run_child(run, [*cli, *overrides], env, args.timeout, out / "console.log", CONSOLE_STEP)
            if run.exit_code == 3 and "no CUDA GPU" in text:
                print("  the CLI refuses cluster=cpu without a GPU: composing and calling run_verl directly",
                      flush=True)
                shutil.rmtree(out / "tensorboard", ignore_errors=True)
                run = PathRun(name, how="python -c compose + run_verl (no preflight)")
                text = run_child(run, [python, "-c", VERL_BY_PYTHON, *overrides], env, args.timeout,
                                 out / "console.log", CONSOLE_STEP)
        if not read_tensorboard(run, out / "tensorboard"):
            read_console(run, text)
        print(f"  exit {run.exit_code}, {run.wall_s:.0f} s, {len(run.timings)} step(s) from {run.source} "
              f"(console: {run.log})", flush=True)
        runs[name] = run

    local, verl = runs["local"], runs["verl"]
    print()
    print(f"verl path vs local loop, tiny Qwen2 (sums), {args.prompts} prompts x {args.n}, TP={args.tp}, "
          f"{args.steps} steps, checkpoint at step {args.steps}; {os.cpu_count()} CPU(s), load average "
          f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after")
    print(f"local: {local.how} (exit {local.exit_code}, {local.source}); "
          f"verl: {verl.how} (exit {verl.exit_code}, {verl.source})")
    print("ratio = local / verl; '-' = not reported by that path\n")
    print_table(local, verl, args.steps)
    failed = [r.name for r in (local, verl) if r.exit_code != 0 or len(r.timings) < args.steps]
    if failed:
        print(f"\nincomplete: {', '.join(failed)} (see the console logs above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
