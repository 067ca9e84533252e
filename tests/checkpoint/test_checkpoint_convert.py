"""HF -> dist checkpoint (TP/PP) -> HF round trips, --verify logits, reshard, corrupt inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ckpt_testlib import run_ranks, tiny_hf_model
from grail_megatron.checkpoint import CheckpointError, UnsupportedModelError
from grail_megatron.checkpoint.relayout import RelayoutJob, run_job


def _from_hf(hf_dir, root, tp, pp):
    return str(run_job(RelayoutJob("from-hf", str(hf_dir), str(root), tp, pp)))


def _to_hf_and_verify(ckpt, out, max_shard_bytes):
    from grail_megatron.checkpoint.to_hf import convert_to_hf
    from grail_megatron.checkpoint.verify import verify_logits

    report = convert_to_hf(ckpt, out, max_shard_bytes=max_shard_bytes, progress=False)
    return report, verify_logits(ckpt, out)


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


CASES = [  # arch, tied, kv_heads, tp, pp, dtype
    ("qwen2", False, 1, 2, 2, "float32"),
    ("llama", True, 2, 2, 1, "float32"),
    ("qwen2", True, 2, 1, 2, "bfloat16"),
]


@pytest.mark.multiproc
@pytest.mark.parametrize("arch,tied,kv_heads,tp,pp,dtype", CASES, ids=lambda v: str(v))
def test_roundtrip_hf_mcore_hf_is_exact_and_logits_agree(tmp_path, arch, tied, kv_heads, tp, pp, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = tiny_hf_model(tmp_path / "hf", arch=arch, tie=tied, kv_heads=kv_heads, dtype=dtype)
    run_ranks(_from_hf, tp * pp, hf, tmp_path / "ckpt", tp, pp)
    actor = tmp_path / "ckpt" / "global_step_0" / "actor"
    out = tmp_path / "out"
    [(report, verify)] = run_ranks(_to_hf_and_verify, 1, actor, out, 100_000)

    original, converted = _hf_tensors(hf), _hf_tensors(out)
    assert sorted(converted) == sorted(original)  # tied: no lm_head; untied: lm_head present
    assert ("lm_head.weight" in converted) is (not tied)
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype, name  # bf16 stays bf16
        assert torch.equal(converted[name], tensor), name
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    assert vocab % 2 == 1 and converted["model.embed_tokens.weight"].shape[0] == vocab  # TP padding trimmed
    assert report.source_layout == {"tp": tp, "pp": pp, "dp": 1, "vpp": 1}
    assert len(report.shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert all((out / s).stat().st_size <= 100_000 + 10_000 for s in report.shards)  # limit + header
    assert verify.ok and verify.max_abs_diff <= 1e-4 and len(verify.per_prompt) == 3
    print(verify.table())

    model = AutoModelForCausalLM.from_pretrained(str(out))  # no extra arguments needed
    assert model.dtype == getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("What is 3 + 4?", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".out.incomplete*"))


def _stored(ckpt_step):
    from grail_megatron.checkpoint.dist_reader import DistCheckpointReader

    reader = DistCheckpointReader(Path(ckpt_step) / "actor" / "model" / "dist_ckpt")
    pieces = reader.read([(key, None) for key in reader.tensors])
    return {key: t.clone() for (key, _), t in pieces.items()}


def _reshard(src, root, tp, pp):
    return str(run_job(RelayoutJob("reshard", str(src), str(root), tp, pp)))


@pytest.mark.multiproc
def test_reshard_tp2pp2_to_tp1pp1_and_back_is_bitwise(tmp_path):
    hf = tiny_hf_model(tmp_path / "hf", arch="qwen2", tie=False, kv_heads=1)
    run_ranks(_from_hf, 4, hf, tmp_path / "a", 2, 2)
    run_ranks(_reshard, 1, tmp_path / "a" / "global_step_0", tmp_path / "b", 1, 1)
    run_ranks(_reshard, 4, tmp_path / "b" / "global_step_0", tmp_path / "c", 2, 2)
    a, b, c = (run_ranks(_stored, 1, tmp_path / x / "global_step_0")[0] for x in "abc")
    assert a.keys() == c.keys() and a
    for key in a:
        assert torch.equal(a[key], c[key]), key
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    # TP1 stores the exact vocabulary, TP2 pads it by one zero row
    assert b["embedding.word_embeddings.weight"].shape[0] == vocab
    assert a["embedding.word_embeddings.weight"].shape[0] == vocab + 1
    assert torch.equal(b["embedding.word_embeddings.weight"], a["embedding.word_embeddings.weight"][:vocab])
    layouts = [json.loads((tmp_path / x / "global_step_0" / "trainer_state.json").read_text())["layout"] for x in "abc"]
    assert [(lay["tp"], lay["pp"]) for lay in layouts] == [(2, 2), (1, 1), (2, 2)]


def _corrupt_cases(base: Path):
    """Each corrupted copy must fail with a clear error and leave no output folder behind."""
    from grail_megatron.checkpoint.to_hf import convert_to_hf

    good = base / "ckpt" / "global_step_0"
    results = {}

    def attempt(name, mutate):
        case = base / f"case_{name}"
        shutil.copytree(good, case / "global_step_0")
        mutate(case / "global_step_0" / "actor")
        out = base / f"out_{name}"
        try:
            convert_to_hf(case / "global_step_0" / "actor", out, progress=False)
            results[name] = "no error"
        except CheckpointError as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
        leftovers = [p.name for p in base.iterdir() if p.name.startswith((f"out_{name}", f".out_{name}"))]
        results[name + ".leftovers"] = leftovers

    dist = lambda actor: actor / "model" / "dist_ckpt"  # noqa: E731
    attempt("missing_shard", lambda a: sorted(dist(a).glob("*.distcp"))[-1].unlink())
    attempt("truncated", lambda a: [open(p, "r+b").truncate(p.stat().st_size // 3) for p in dist(a).glob("*.distcp")])
    attempt("no_metadata", lambda a: (dist(a) / ".metadata").unlink())

    def edit_config(actor, **changes):
        path = actor / "model" / "huggingface" / "config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))

    attempt("layers_mismatch", lambda a: edit_config(a, num_hidden_layers=3, layer_types=["full_attention"] * 3))
    attempt("bad_config", lambda a: edit_config(a, num_hidden_layers=3))  # transformers refuses it itself
    attempt("tied_mismatch", lambda a: edit_config(a, tie_word_embeddings=True))
    attempt("hidden_mismatch", lambda a: edit_config(a, intermediate_size=64))
    attempt("unsupported", lambda a: edit_config(a, model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    return results


@pytest.mark.multiproc
def test_corrupt_or_mismatched_checkpoints_are_refused(tmp_path):
    hf = tiny_hf_model(tmp_path / "hf", arch="qwen2", tie=False, kv_heads=2)
    run_ranks(_from_hf, 1, hf, tmp_path / "ckpt", 1, 1)
    [results] = run_ranks(_corrupt_cases, 1, tmp_path)
    for name, message in results.items():
        if name.endswith(".leftovers"):
            assert message == [], f"{name}: {message}"
    assert "distcp" in results["missing_shard"] and "reading" in results["missing_shard"]
    assert "reading" in results["truncated"]
    assert "not a complete dist checkpoint (no .metadata" in results["no_metadata"]
    assert "stores 2 layers but config.json has num_hidden_layers=3" in results["layers_mismatch"]
    assert "config.json: cannot load" in results["bad_config"] and "num_hidden_layers" in results["bad_config"]
    assert "two checkpoint tensors map to model.embed_tokens.weight: config.json says tie_word_embeddings=True" \
        in results["tied_mismatch"]
    assert "checkpoint (128, 64) vs config (64, 64)" in results["hidden_mismatch"]
    assert results["unsupported"].startswith("UnsupportedModelError: model_type 'gpt2'")
    assert issubclass(UnsupportedModelError, CheckpointError)


def test_verl_checkpoint_with_hf_weights_is_resharded_and_checked(tmp_path):
    """verl's default (use_dist_checkpointing=False) saves the weights as HF under model/huggingface."""
    from safetensors.torch import save_file

    from grail_megatron.checkpoint.to_hf import convert_to_hf

    hf = tiny_hf_model(tmp_path / "hf", arch="llama", tie=False, kv_heads=2, dtype="bfloat16")
    weights = _hf_tensors(hf)
    actor_hf = tmp_path / "run" / "global_step_3" / "actor" / "model" / "huggingface"
    shutil.copytree(hf, actor_hf)
    report = convert_to_hf(tmp_path / "run" / "global_step_3" / "actor", tmp_path / "out", max_shard_bytes=50_000,
                           progress=False)
    converted = _hf_tensors(tmp_path / "out")
    assert len(report.shards) > 1 and report.dtype == "bfloat16"
    assert converted.keys() == weights.keys() and all(torch.equal(converted[k], weights[k]) for k in weights)

    # a sharded source whose index names a shard that is gone; then a tensor missing from the weights
    (actor_hf / "model.safetensors").unlink()
    shutil.copy(tmp_path / "out" / "model.safetensors.index.json", actor_hf)
    for shard in report.shards[1:]:
        shutil.copy(tmp_path / "out" / shard, actor_hf / shard)
    with pytest.raises(CheckpointError, match=rf"shard {report.shards[0]} listed in model.safetensors.index.json is missing"):
        convert_to_hf(actor_hf.parent.parent, tmp_path / "out2", progress=False)
    for f in actor_hf.glob("model*"):
        f.unlink()
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, str(actor_hf / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"weights do not match config.json: missing \['lm_head.weight'\]"):
        convert_to_hf(actor_hf.parent.parent, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))
