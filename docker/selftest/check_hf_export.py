"""GPU self-test, last part: the HF folder converted from the GRPO checkpoint is a usable model.

Checks, each printed as `PASS <check>: ...` / `FAIL <check>: ...`:
  hf_load        transformers loads it; same tensor names and shapes as the initial model
  hf_trained     the weights moved away from the initial ones (the two GRPO steps updated them)
                 and every tensor is finite
  vllm_generate  vLLM serves it: greedy completion of a prompt, and vLLM's log-probs of the
                 generated tokens agree with transformers' (skipped with --no-vllm, e.g. on CPU)

    python docker/selftest/check_hf_export.py --hf-dir OUT --initial-dir TINY_MODEL [--no-vllm]
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

PROMPT = "What is 2 + 3?"


def load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def check_load(hf_dir: str, initial_dir: str) -> str:
    exported, initial = load(hf_dir).state_dict(), load(initial_dir).state_dict()
    assert exported.keys() == initial.keys(), sorted(set(exported) ^ set(initial))[:10]
    shapes = {k: (tuple(exported[k].shape), tuple(initial[k].shape)) for k in exported}
    bad = {k: s for k, s in shapes.items() if s[0] != s[1]}
    assert not bad, bad
    return f"{len(exported)} tensors, names and shapes as the initial model"


def check_trained(hf_dir: str, initial_dir: str) -> str:
    exported, initial = load(hf_dir).state_dict(), load(initial_dir).state_dict()
    assert all(torch.isfinite(t).all() for t in exported.values()), "non-finite weights"
    moved = [k for k in exported if not torch.equal(exported[k], initial[k])]
    assert moved, "no tensor differs from the initial model: the update did not reach the checkpoint"
    biggest = max((exported[k] - initial[k]).abs().max().item() for k in moved)
    return f"{len(moved)}/{len(exported)} tensors updated (max |change| {biggest:.3g})"


def check_vllm(hf_dir: str) -> str:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    llm = LLM(model=hf_dir, dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.3, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)
    (out,) = llm.generate([{"prompt_token_ids": prompt_ids}], params)
    completion = out.outputs[0]
    generated = list(completion.token_ids)
    assert generated, "vLLM generated nothing"
    vllm_lp = torch.tensor([step[tok].logprob for step, tok in zip(completion.logprobs, generated)])
    model = load(hf_dir)
    ids = torch.tensor([prompt_ids + generated])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    hf_lp = logp[len(prompt_ids) - 1:].gather(1, torch.tensor(generated)[:, None])[:, 0]
    diff = (vllm_lp - hf_lp).abs().max().item()
    assert diff < 0.1, f"vLLM and transformers disagree on log-probs by {diff:.3g}"
    return f"{len(generated)} tokens, log-probs agree with transformers to {diff:.3g} (bf16)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--initial-dir", required=True, help="the model the GRPO run started from")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM generation (no GPU)")
    args = parser.parse_args(argv)
    checks: dict[str, Callable[[], str]] = {
        "hf_load": lambda: check_load(args.hf_dir, args.initial_dir),
        "hf_trained": lambda: check_trained(args.hf_dir, args.initial_dir),
    }
    if not args.no_vllm:
        checks["vllm_generate"] = lambda: check_vllm(args.hf_dir)
    failed = 0
    for name, check in checks.items():
        try:
            print(f"PASS {name}: {check()}", flush=True)
        except Exception as exc:  # report each check
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
