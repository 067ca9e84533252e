"""Benchmark `grail-megatron convert to-hf`: streaming vs loading the whole checkpoint first.

    .venv/bin/python benchmarks/convert.py [--work DIR] [--layers 16] [--max-shard-size 200MB]

Builds a random-init bf16 Qwen2 of ~1 GB, converts it once to a TP1/PP1 dist checkpoint
(`from-hf`), then converts that checkpoint back to HF twice, each in a fresh process:
  streaming  the converter (one transformer layer in memory at a time, shards written in place)
  baseline   read every tensor of the checkpoint into memory, then map and write the shards
             (safetensors.save_file per shard, then fsync like the converter)
and reports wall time, throughput (output GB / s) and peak RSS (ru_maxrss of the process),
plus the RSS of a process that only imports the same libraries (the fixed overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak resident memory while the work runs (sampled every 2 ms in a thread).

    ru_maxrss would also count the import-time spike of torch/transformers, which is larger
    than the conversion itself for a 1 GB model.
    """

    def __init__(self):
        import threading

        self.before = _rss_bytes()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(0.002)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        return {"rss_before": self.before, "rss_peak": self.peak}


# ----------------------------------------------------------------------------- child modes


def _setup(mode: str, warmup_ckpt: str, work: str) -> None:
    """Fixed overhead before the RSS baseline: imports, the single-rank group, and one conversion
    of a tiny checkpoint with the same code path (lazy imports, mbridge, transformers classes)."""
    import shutil

    from grail_megatron.checkpoint import to_hf

    to_hf.ensure_single_rank_group()
    out = Path(work) / f"warmup_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    (child_streaming if mode == "streaming" else child_baseline)(warmup_ckpt, str(out), 10**9)


def child_streaming(ckpt: str, out: str, max_shard: int) -> dict:
    from grail_megatron.checkpoint.to_hf import convert_to_hf

    report = convert_to_hf(ckpt, out, max_shard_bytes=max_shard, progress=False)
    return {"bytes": report.total_bytes, "shards": len(report.shards)}


def child_baseline(ckpt: str, out: str, max_shard: int) -> dict:
    """The non-streaming way: whole checkpoint in memory, then shards built in memory and saved."""
    from safetensors.torch import save_file

    from grail_megatron.checkpoint.dist_reader import DistCheckpointReader
    from grail_megatron.checkpoint.layout import ActorPaths, resolve_actor_dir
    from grail_megatron.checkpoint.safetensors_stream import plan_shards
    from grail_megatron.checkpoint.to_hf import _Mapper, check_against_config, ensure_single_rank_group, load_hf_config, plan_units

    actor = ActorPaths.detect(resolve_actor_dir(ckpt))
    hf_config, _ = load_hf_config(actor, None)
    ensure_single_rank_group()
    reader = DistCheckpointReader(actor.model_dist)
    everything = reader.read([(key, None) for key in reader.tensors])  # the whole checkpoint
    mapper = _Mapper(hf_config)
    units = plan_units(reader, mapper, hf_config)
    specs = check_against_config(units, hf_config, actor.model_dist)
    hf = {}
    for unit in units:
        parts = [everything[(key, None)] if unit.layer is None else everything[(key, None)][unit.layer] for key in unit.reads]
        import torch

        full = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        for name, tensor in mapper(unit.mcore_name, full):
            hf[name] = tensor.to(specs[0].dtype).contiguous()
    Path(out).mkdir(parents=True, exist_ok=True)
    total = 0
    for shard in plan_shards(specs, max_shard):
        save_file({s.name: hf[s.name] for s in shard.specs}, str(Path(out) / shard.filename))
        total += sum(s.nbytes for s in shard.specs)
    from grail_megatron.checkpoint.fsutil import fsync_tree

    fsync_tree(out)  # the same durability as the converter (which fsyncs before its rename)
    return {"bytes": total}


def _child_main(argv: list[str]) -> None:
    mode, *args = argv
    _setup(mode, args[3], args[4])
    sampler = RssSampler()
    start = time.perf_counter()
    if mode == "streaming":
        result = child_streaming(args[0], args[1], int(args[2]))
    else:
        result = child_baseline(args[0], args[1], int(args[2]))
    result.update(seconds=time.perf_counter() - start, **sampler.stop())
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent


def _run_child(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child {args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _make_model(work: Path, layers: int, name: str = "hf", hidden: int = 1536, vocab: int = 32000) -> Path:
    """Random-init bf16 Qwen2 (~1 GB with 16 layers) saved as an HF folder."""
    hf = work / name
    if (hf / "config.json").exists():
        return hf
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=2048, rope_theta=10000.0, dtype="bfloat16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(hf), max_shard_size="2GB")
    return hf


def _make_checkpoint(work: Path, hf: Path, name: str = "ckpt") -> Path:
    from grail_megatron.checkpoint.relayout import RelayoutJob

    root = work / name
    if not (root / "global_step_0").exists():
        job = RelayoutJob("from-hf", str(hf), str(root), 1, 1)
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", PYTHONWARNINGS="ignore")
        subprocess.run([sys.executable, "-m", "grail_megatron.checkpoint.relayout", job.to_json()], env=env, check=True,
                       capture_output=True)
    return root / "global_step_0" / "actor"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/grail-convert-bench")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--max-shard-size", default="200MB")
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.child:
        _child_main(args.child)
        return

    import shutil

    from grail_megatron.checkpoint.dist_reader import DistCheckpointReader
    from grail_megatron.checkpoint.safetensors_stream import parse_size

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    max_shard = parse_size(args.max_shard_size)
    hf = _make_model(work, args.layers)
    ckpt = _make_checkpoint(work, hf)
    warmup = _make_checkpoint(work, _make_model(work, 1, name="hf_tiny", hidden=96, vocab=512), name="ckpt_tiny")
    reader = DistCheckpointReader(ckpt / "model" / "dist_ckpt")
    sizes = {k: 2 * eval("*".join(map(str, t.shape))) for k, t in reader.tensors.items()}
    largest_tensor = max(v // (t.shape[0] if k.startswith("decoder.layers.") else 1)
                         for (k, v), t in zip(sizes.items(), reader.tensors.values()))
    largest_layer_tensors = max(sizes[k] // reader.tensors[k].shape[0] for k in sizes if k.startswith("decoder.layers."))

    rows = []
    for mode in ("streaming", "baseline"):
        out = work / f"out_{mode}"
        shutil.rmtree(out, ignore_errors=True)
        result = _run_child(mode, str(ckpt), str(out), str(max_shard), str(warmup), str(work))
        rows.append((mode, result))
        largest_shard = max(p.stat().st_size for p in out.glob("*.safetensors"))
    total_gb = rows[0][1]["bytes"] / 1e9
    print(f"model: {total_gb:.3f} GB bf16 ({args.layers} layers), checkpoint TP1/PP1, shards <= {args.max_shard_size}; "
          f"largest tensor {largest_tensor / 1e6:.0f} MB, largest layer {largest_layer_tensors / 1e6:.0f} MB "
          f"(one tensor), largest shard {largest_shard / 1e6:.0f} MB; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    print()
    print("| method | seconds | GB/s | RSS before (GB) | peak RSS (GB) | peak - before (GB) |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows:
        grow = r["rss_peak"] - r["rss_before"]
        print(f"| {mode} | {r['seconds']:.1f} | {r['bytes'] / 1e9 / r['seconds']:.3f} | {r['rss_before'] / 1e9:.2f} | "
              f"{r['rss_peak'] / 1e9:.2f} | {grow / 1e9:.2f} |")
    stream, base = rows[0][1], rows[1][1]
    bound = largest_shard + largest_tensor
    grow = stream["rss_peak"] - stream["rss_before"]
    print()
    print(f"streaming: peak - before = {grow / 1e9:.2f} GB vs bound largest shard + largest tensor = {bound / 1e9:.2f} GB "
          f"-> {'within' if grow <= bound else 'EXCEEDS'} the bound; baseline needs "
          f"{(base['rss_peak'] - base['rss_before']) / max(1, grow):.1f}x the memory, streaming is "
          f"{base['seconds'] / stream['seconds']:.2f}x the baseline's speed")


if __name__ == "__main__":
    main()
