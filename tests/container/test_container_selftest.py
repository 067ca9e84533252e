"""scripts/gpu_selftest.sh and its helpers in docker/selftest/, as far as a CPU can take them.

The GPU checks (TE, Apex, flash-attn kernels, vLLM, the verl run) are verified by users in the
image, not here. What runs here for real: the script's `--cpu` mode end to end (tiny model,
a TP2 forward on gloo compared with Hugging Face, GSM8K fixture data), its failure reporting,
the export check on two real models, the GRPO overrides through our Hydra composition and
verl's validator, and every project command and module the script relies on.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from container_helpers import ROOT

SCRIPT = ROOT / "scripts" / "gpu_selftest.sh"
HELPERS = ROOT / "docker" / "selftest"
GPU_CHECKS = ["gpus", "kernels", "tiny_model", "tp2_te_vs_local", "data", "grpo_2_steps",
              "grpo_2_steps_no_dist_optim", "convert_to_hf", "hf_export"]
BARE_CHECKS = ["install", "cuda", "components", "tiny_model", "megatron_cuda_vs_cpu", "data", "grpo_config",
               "grpo_2_steps", "grpo_2_steps_no_dist_optim", "convert_to_hf", "hf_export", "throughput",
               "time_budget"]
# imported by the helpers only inside functions that run on a GPU node (not installed here)
GPU_ONLY_MODULES = {"amp_C", "fused_layer_norm_cuda", "apex", "transformer_engine", "flash_attn", "vllm"}


def script_env(env: dict | None = None) -> dict:
    bin_dir = str(Path(sys.executable).parent)  # grail-megatron and torchrun of this venv
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1", **(env or {})}


def run_script(*args: str, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=script_env(env), timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory, small_wheelhouse):
    """The three long runs of this file, started first and together so they overlap with the
    other tests on the two cores: the script's `--cpu` mode, its `--bare --cpu` mode (installing
    the small real wheelhouse of conftest from its parts) and `grail-megatron train --dry-run`
    with the image's GRPO overrides."""
    work = tmp_path_factory.mktemp("selftest")
    cpu = subprocess.Popen(["bash", str(SCRIPT), "--cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=script_env({"GRAIL_SELFTEST_DIR": str(work)}),
                           start_new_session=True)  # its own process group: torchrun and ranks
    bare_work = tmp_path_factory.mktemp("selftest-bare")
    bare = subprocess.Popen(["bash", str(SCRIPT), "--bare", "--cpu", "--wheelhouse", str(small_wheelhouse / "parts")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=script_env({"GRAIL_SELFTEST_DIR": str(bare_work)}), start_new_session=True)
    printed = run_script("--print-grpo-overrides", env={"GRAIL_SELFTEST_DIR": "/work/selftest"})
    assert printed.returncode == 0, printed.stderr
    exe = Path(sys.executable).parent / "grail-megatron"
    dry_log = work / "dry_run.out"  # files, not pipes: the resolved config is ~35 KB
    with dry_log.open("w") as out, (work / "dry_run.err").open("w") as err:
        dry = subprocess.Popen([str(exe), "train", "--dry-run", "--print-config", *printed.stdout.split()], stdout=out,
                               stderr=err, text=True, env=script_env(), start_new_session=True)
    yield {"cpu": (work, cpu), "dry_run": (printed.stdout.split(), dry, dry_log), "bare": (bare_work, bare)}
    for proc in (cpu, dry, bare):  # only if a test stopped early: end the run and everything it started
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def resolved_config(dry_run_output: str) -> dict:
    """The YAML section of `grail-megatron train --dry-run --print-config` (up to the next heading)."""
    import yaml

    section = dry_run_output.split("# resolved config\n", 1)[1]
    return yaml.safe_load(re.split(r"^# ", section, maxsplit=1, flags=re.M)[0])


def load_helper(name: str):
    spec = importlib.util.spec_from_file_location(f"selftest_{name}", HELPERS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- static


def test_script_is_valid_bash_and_executable():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    assert os.access(SCRIPT, os.X_OK)


def test_help_describes_every_check_and_says_ci_does_not_run_it():
    done = run_script("--help")
    assert done.returncode == 0
    for check in GPU_CHECKS + BARE_CHECKS:
        assert re.search(rf"^  {check}\s", done.stdout, flags=re.M), f"--help does not describe {check}"
    assert "not in CI" in done.stdout
    assert run_script("--bogus").returncode == 2


def test_bad_mode_combinations_are_refused():
    no_wheelhouse = run_script("--bare")
    assert no_wheelhouse.returncode == 2 and "--bare needs --wheelhouse DIR" in no_wheelhouse.stderr
    assert run_script("--wheelhouse", "/tmp").returncode == 2  # only with --bare
    assert run_script("--bare", "--wheelhouse", "/nonexistent/wheelhouse").returncode == 2


def test_gpu_mode_runs_the_documented_checks_in_order():
    text = SCRIPT.read_text()
    declared = re.search(r"^CHECKS_GPU=\(([^)]*)\)", text, flags=re.M).group(1).split()
    assert declared == GPU_CHECKS
    gpu_branch = text[text.index('elif [ "${MODE}" = gpu ]; then'):text.index('checks=("${CHECKS_GPU[@]}")')]
    assert re.findall(r"run_check (\w+) ", gpu_branch) == GPU_CHECKS


def test_helpers_compile_and_import_only_what_exists():
    """Every `grail_megatron`/`megatron` name a helper imports exists on this stack."""
    for path in sorted(HELPERS.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        compile(tree, str(path), "exec")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module, names = node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                module, names = None, [a.name for a in node.names]
            else:
                continue
            for target in ([module] if module else names):
                top = target.split(".")[0]
                if top in GPU_ONLY_MODULES:
                    assert node.col_offset > 0, f"{path.name}: GPU-only import of {target} at top level"
                    continue
                imported = importlib.import_module(target)
                for name in names if module else []:
                    assert hasattr(imported, name) or importlib.util.find_spec(f"{target}.{name}"), (
                        f"{path.name}: {target} has no {name}")


def test_kernel_check_uses_real_megatron_names():
    import megatron.core.extensions.transformer_engine as mcore_te
    from megatron.core.optimizer import clip_grads

    assert isinstance(mcore_te.HAVE_TE, bool) and not mcore_te.HAVE_TE  # no TE here; the check asserts True
    from megatron.core.utils import local_multi_tensor_applier

    assert clip_grads.multi_tensor_applier is local_multi_tensor_applier  # the fallback the check rejects
    kernels = load_helper("check_kernels")
    assert list(kernels.CHECKS) == ["torch_cuda", "apex", "transformer_engine", "flash_attn",
                                    "megatron_fused", "megatron_patches", "vllm_import"]


# --------------------------------------------------------------------------- project commands


def command_lines() -> list[str]:
    """Script lines that run `grail-megatron ...` (comments and quoted text such as echo skipped)."""
    lines = [line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#")]
    return [line for line in lines if re.search(r'(?<!["\w-])grail-megatron ', line)]


def referenced_commands() -> list[list[str]]:
    """`grail-megatron <command> [<subcommand>]` as the script calls them."""
    commands = set()
    for line in command_lines():
        for cmd, sub in re.findall(r'(?<!["\w-])grail-megatron ([a-z][a-z-]*)(?: ([a-z][a-z-]*)(?=\s))?', line):
            commands.add((cmd, sub) if sub else (cmd,))
    return [list(c) for c in sorted(commands)]


def test_script_calls_the_project_commands_it_documents():
    called = {" ".join(c) for c in referenced_commands()}
    assert called == {"train", "prepare-data", "convert to-hf"}, called


@pytest.mark.parametrize("command", referenced_commands(), ids=" ".join)
def test_every_project_command_it_calls_exists(command):
    exe = Path(sys.executable).parent / "grail-megatron"
    done = subprocess.run([str(exe), *command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"grail-megatron {' '.join(command)} --help failed:\n{done.stderr[-2000:]}"
    invocation = f"grail-megatron {' '.join(command)} "
    flags = {f for line in command_lines() if invocation in line
             for f in line.split(invocation, 1)[1].split() if f.startswith("--")}
    for flag in flags:
        assert flag in done.stdout, f"{flag} is not an option of grail-megatron {' '.join(command)}"


def test_grpo_run_passes_the_trainers_dry_run(background):
    """`grail-megatron train --dry-run` with the self-test's overrides: our composition, the
    planner and verl's validate_config all accept the two-step run; the resolved config is it."""
    overrides, proc, log = background["dry_run"]
    proc.wait(timeout=600)
    out = log.read_text()
    assert "actor_rollout_ref.rollout.name=vllm" in overrides
    assert proc.returncode == 0, out[-3000:] + log.with_suffix(".err").read_text()[-3000:]
    assert "RESULT: the configured run passes every check." in out
    assert "verl validate_config: passed" in out
    resolved = resolved_config(out)
    trainer, rollout = resolved["trainer"], resolved["actor_rollout_ref"]["rollout"]
    assert (trainer["total_training_steps"], trainer["save_freq"], trainer["n_gpus_per_node"]) == (2, 2, 2)
    assert trainer["default_local_dir"] == "/work/selftest/checkpoints"
    assert (rollout["name"], rollout["n"]) == ("vllm", 2)
    megatron = resolved["actor_rollout_ref"]["actor"]["megatron"]
    assert megatron["tensor_model_parallel_size"] == 2
    # what issue 12 fixed: verl's engine on the mbridge path, verl's sync semantics in our mode
    assert megatron["vanilla_mbridge"] is True and megatron["use_distributed_optimizer"] is True
    assert trainer["v1"]["trainer_mode"] == "grail_megatron"
    assert resolved["actor_rollout_ref"]["model"]["path"] == "/work/selftest/tiny_model"
    assert list(resolved["data"]["train_files"]) == ["/work/selftest/data/gsm8k/train.parquet"]


def test_tiny_model_matches_the_tiny_preset():
    from grail_megatron.config import compose

    facts = compose(["model_preset=tiny"]).grail.model
    tiny = load_helper("make_tiny_model").TINY
    assert (tiny["hidden"], tiny["intermediate"], tiny["layers"], tiny["heads"], tiny["kv_heads"]) == (
        facts.hidden_size, facts.intermediate_size, facts.num_layers, facts.num_attention_heads,
        facts.num_key_value_heads)
    assert tiny["tie_word_embeddings"] is facts.tie_word_embeddings and tiny["arch"] == "qwen2"


# --------------------------------------------------------------------------- running it


@pytest.fixture(scope="module")
def cpu_run(background):
    work, proc = background["cpu"]
    out, err = proc.communicate(timeout=600)
    return work, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.multiproc
def test_cpu_mode_passes_end_to_end(cpu_run):
    work, done = cpu_run
    assert done.returncode == 0, done.stdout + done.stderr
    verdicts = re.findall(r"^(PASS|FAIL) (\w+)", done.stdout, flags=re.M)
    assert verdicts == [("PASS", "tiny_model"), ("PASS", "tp2_local_vs_local"), ("PASS", "data")]
    assert done.stdout.rstrip().endswith("3 passed, 0 failed")
    assert (work / "tiny_model" / "model.safetensors").is_file()
    assert (work / "data" / "gsm8k" / "train.parquet").is_file()
    assert (work / "logs" / "tp2_local_vs_local.log").is_file()


@pytest.mark.multiproc
def test_cpu_tp2_forward_matches_hugging_face(cpu_run):
    _, done = cpu_run
    same = re.search(r"PASS tp2_local_vs_local: max \|diff\| = (\S+)", done.stdout)
    vs_hf = re.search(r"PASS tp2_local_vs_hf: max \|diff\| = (\S+)", done.stdout)
    assert same and vs_hf, done.stdout
    assert float(same.group(1)) == 0.0  # the same spec twice: bitwise equal
    assert float(vs_hf.group(1)) < 1e-5  # Megatron TP2 (gloo) vs transformers, fp32


def test_a_failing_check_is_reported_and_counted(tmp_path):
    done = run_script("--cpu", env={"GRAIL_SELFTEST_DIR": str(tmp_path), "GRAIL_SELFTEST_ONLY": "tiny_model",
                                     "PYTHON": "false"})
    assert done.returncode == 1
    assert re.search(r"^FAIL tiny_model \(exit 1, \d+ s; log: .*tiny_model\.log\)$", done.stdout, flags=re.M)
    assert done.stdout.rstrip().endswith("0 passed, 1 failed")


def test_dependent_checks_are_skipped_after_a_failure(tmp_path):
    done = run_script("--cpu", env={"GRAIL_SELFTEST_DIR": str(tmp_path), "PYTHON": "false",
                                     "GRAIL_SELFTEST_ONLY": "tiny_model,tp2_local_vs_local"})
    assert "FAIL tp2_local_vs_local: skipped, needs tiny_model" in done.stdout
    assert done.returncode == 2


@pytest.mark.multiproc
def test_export_check_on_two_real_models(cpu_run, tmp_path):
    """check_hf_export's transformers checks: a retrained copy passes, an untouched one fails."""
    from grail_megatron.models.tiny import make_tiny_model

    work, done = cpu_run
    assert done.returncode == 0
    initial = work / "tiny_model"
    export = load_helper("check_hf_export")
    other = make_tiny_model(tmp_path / "other", tokenizer_dir=work / "tiny_model-tokenizer", seed=1,
                            **load_helper("make_tiny_model").TINY)
    assert "tensors, names and shapes as the initial model" in export.check_load(str(other), str(initial))
    assert re.match(r"\d+/\d+ tensors updated", export.check_trained(str(other), str(initial)))
    with pytest.raises(AssertionError, match="no tensor differs"):
        export.check_trained(str(initial), str(initial))


def test_the_optimizer_setting_is_exercised_both_ways():
    """grpo_2_steps and grpo_2_steps_no_dist_optim differ only in the optimizer (and where they write)."""
    for bare in ((), ("--bare",)):
        on = run_script(*bare, "--print-grpo-overrides", "true", env={"GRAIL_SELFTEST_DIR": "/w"}).stdout.split()
        off = run_script(*bare, "--print-grpo-overrides", "false", env={"GRAIL_SELFTEST_DIR": "/w"}).stdout.split()
        assert "actor_rollout_ref.actor.megatron.use_distributed_optimizer=true" in on
        assert "actor_rollout_ref.actor.megatron.use_distributed_optimizer=false" in off
        changed = {line.split("=", 1)[0] for line in set(on) ^ set(off)}
        assert changed == {"actor_rollout_ref.actor.megatron.use_distributed_optimizer",
                           "trainer.experiment_name", "trainer.default_local_dir"}, changed
        assert "trainer.default_local_dir=/w/checkpoints" in on
        assert "trainer.default_local_dir=/w/checkpoints_no_dist_optim" in off
        for key in ("actor_rollout_ref.actor.megatron.vanilla_mbridge=true", "trainer.v1.trainer_mode=grail_megatron"):
            assert key in on, (bare, key)


def test_bare_overrides_follow_the_components_found(tmp_path):
    """Without TE/Apex/vLLM the bare run uses the HF rollout and the kernel-free settings; with
    them (as the `components` check records them), vLLM and the fused paths."""
    absent = run_script("--bare", "--print-grpo-overrides", env={"GRAIL_SELFTEST_DIR": str(tmp_path)}).stdout.split()
    assert "actor_rollout_ref.rollout.name=hf" in absent and "trainer.n_gpus_per_node=1" in absent
    otc = "++actor_rollout_ref.actor.megatron.override_transformer_config"
    for line in ("actor_rollout_ref.model.use_remove_padding=false", f"{otc}.attention_backend=local",
                 f"{otc}.masked_softmax_fusion=false", f"{otc}.gradient_accumulation_fusion=false"):
        assert line in absent, line
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "components.json").write_text(json.dumps({"components": {
        "transformer_engine": "2.16.1", "apex": "0.1", "apex_fused_softmax": "present", "flash_attn": "2.8.3",
        "vllm": "0.24.0"}}))
    present = run_script("--bare", "--print-grpo-overrides", env={"GRAIL_SELFTEST_DIR": str(tmp_path)}).stdout.split()
    assert "actor_rollout_ref.rollout.name=vllm" in present
    assert not [line for line in present if line.startswith(otc) or "use_remove_padding" in line]


@pytest.fixture(scope="module")
def bare_run(background):
    work, proc = background["bare"]
    out, err = proc.communicate(timeout=600)
    return work, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.multiproc
def test_bare_cpu_mode_reports_every_check(bare_run):
    """`--bare --cpu`: the real install from the wheelhouse parts, every CPU-runnable check,
    the GPU checks SKIP with their reason, in the documented order."""
    work, done = bare_run
    assert done.returncode == 0, done.stdout + done.stderr
    verdicts = re.findall(r"^(PASS|FAIL|SKIP) (\w+)", done.stdout, flags=re.M)
    assert [name for _, name in verdicts] == BARE_CHECKS
    expected_skips = {"cuda", "megatron_cuda_vs_cpu", "grpo_2_steps", "grpo_2_steps_no_dist_optim",
                      "convert_to_hf", "hf_export", "throughput"}
    assert {n for s, n in verdicts if s == "SKIP"} == expected_skips
    assert {n for s, n in verdicts if s == "PASS"} == set(BARE_CHECKS) - expected_skips
    for name in expected_skips:  # each SKIP says why
        assert re.search(rf"^SKIP {name}: \S", done.stdout, flags=re.M), name
    for sub in ("wheelhouse_verify", "wheelhouse_install", "node_torch_untouched", "megatron_cpu_reference",
                "grpo_config_dry_run", "throughput_harness"):
        assert re.search(rf"^  PASS {sub}: ", done.stdout, flags=re.M), sub
    for sub in ("cuda", "nccl", "bf16", "transformer_engine", "apex", "flash_attn", "vllm"):
        assert re.search(rf"^  SKIP {sub}: ", done.stdout, flags=re.M), sub
    # the benchmark's CPU mode on verl's engine: one line with the figures of its bf16 run
    assert re.search(r"^  PASS throughput_harness: CPU: tiny shape \(0\.000338B params, random init\), bf16, seq 64, "
                     r"2 seq/step: [\d,]+ tokens/s, .*verl's engine \(LocalPolicy\.update_actor\), recompute off, "
                     r"local spec$", done.stdout, flags=re.M), done.stdout
    assert done.stdout.rstrip().endswith("6 passed, 0 failed, 7 skipped")


@pytest.mark.multiproc
def test_bare_cpu_mode_writes_the_json_report(bare_run):
    import torch

    work, done = bare_run
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((work / "report.json").read_text())
    assert report["mode"] == "bare-cpu"
    assert [c["name"] for c in report["checks"]] == BARE_CHECKS
    assert report["counts"] == {"passed": 6, "failed": 0, "skipped": 7}
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["grpo_2_steps"]["reason"] == "no GPU (--cpu)"
    assert [s["name"] for s in by_name["install"]["sub_checks"]] == [
        "wheelhouse_verify", "wheelhouse_install", "node_torch_untouched"]
    results = report["results"]
    assert results["install"]["node_torch"]["file"] == torch.__file__ and results["install"]["files"] == 3
    assert results["components"]["components"] == {
        "transformer_engine": None, "apex": None, "apex_fused_softmax": None, "flash_attn": None, "vllm": None}
    assert results["megatron_cuda_vs_cpu"]["cpu_adjustments"]  # active on the CPU side, as expected
    harness = results["throughput_harness"]
    assert harness["tokens_per_s"] > 0 and harness["mfu"] is None and harness["device"] == "cpu"
    throughput = load_throughput()
    assert harness["flops_per_token"] == throughput.flops_per_token(harness["shape"], harness["seq"])
    # verl's engine in bf16 trained the tiny preset's shape (2 layers, hidden 128, vocab 324, tied:
    # 337,536 parameters) with one optimizer step per 2 x 64 tokens; the loss and gradient are real
    assert harness["engine"].startswith("verl ") and harness["dtype"] == "bf16" and harness["steps"] == 2
    assert harness["shape"] == throughput.model_shape("tiny") and harness["params"] == 337_536
    assert harness["grad_norm"] > 0 and abs(harness["pg_loss"]) < 10 and harness["seconds"] > 0
    assert harness["tokens_per_s"] == pytest.approx(2 * 64 * 2 / harness["seconds"], rel=1e-2)
    assert harness["layer_spec"] == "local" and harness["recompute"] is False and harness["remove_padding"] is False


@pytest.mark.multiproc
def test_bare_cpu_mode_uses_the_prefix_and_the_bare_overrides(bare_run):
    work, done = bare_run
    assert done.returncode == 0, done.stdout + done.stderr
    prefix_site = work / "prefix" / "lib" / "python3.12" / "site-packages"
    assert (prefix_site / "six.py").is_file() and not (prefix_site / "torch").exists()
    resolved = resolved_config((work / "logs" / "grpo_config.resolved").read_text())
    arr = resolved["actor_rollout_ref"]
    megatron = arr["actor"]["megatron"]
    assert arr["rollout"]["name"] == "hf" and resolved["trainer"]["n_gpus_per_node"] == 1
    assert megatron["vanilla_mbridge"] is True and megatron["use_distributed_optimizer"] is True
    assert megatron["tensor_model_parallel_size"] == 1 and arr["model"]["use_remove_padding"] is False
    assert resolved["trainer"]["v1"]["trainer_mode"] == "grail_megatron"
    otc = megatron["override_transformer_config"]
    assert otc["attention_backend"] == "local" and otc["masked_softmax_fusion"] is False
    assert otc["gradient_accumulation_fusion"] is False


def load_throughput():
    spec = importlib.util.spec_from_file_location("bench_actor_throughput", ROOT / "benchmarks" / "actor_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_flops_and_peaks():
    bench = load_throughput()
    shape = bench.model_shape("qwen2.5-1.5b")
    assert (shape["num_layers"], shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]) == (
        28, 1536, 8960, 151936)
    per_layer = 1536 * 1536 * 2 + 2 * 1536 * 256 + 3 * 1536 * 8960
    assert bench.flops_per_token(shape, 2048) == 6 * (28 * per_layer + 151936 * 1536) + 6 * 28 * 1536 * 2048
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.4
    assert bench.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert bench.peak_tflops("NVIDIA GH200 480GB", None) == 989.4
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert bench.peak_tflops("NVIDIA L40S", None) == 362.1
    assert bench.peak_tflops("Some Future GPU", None) is None
    assert bench.peak_tflops("Some Future GPU", 123.0) == 123.0


def test_throughput_runs_bf16_only_and_composes_the_gpu_config():
    """verl's engine keeps bf16/fp16 parameters: --dtype fp32 is refused before anything is built.
    The GPU run's overrides compose: the 1.5B preset at TP1 from the HF folder (no dist
    checkpoint), recompute as asked, and the kernel-free settings where TE/Apex are absent."""
    from omegaconf import OmegaConf

    from grail_megatron.config import compose

    bench = load_throughput()
    with pytest.raises(SystemExit) as refused:
        bench.main(["--device", "cpu", "--preset", "tiny", "--dtype", "fp32"])
    assert refused.value.code == 2
    args = bench.argparse.Namespace(preset="qwen2.5-1.5b", device="cuda", batch=8, micro_batch=1)
    for te, recompute in ((False, True), (True, False)):
        cfg = compose(bench.overrides(args, Path("/m"), recompute, te))
        arr = cfg.actor_rollout_ref
        otc = OmegaConf.to_container(arr.actor.megatron.override_transformer_config)
        assert cfg.grail.model.name == "qwen2.5-1.5b-instruct" and arr.model.path == "/m"
        assert arr.actor.megatron.tensor_model_parallel_size == 1 and arr.actor.megatron.dtype == "bfloat16"
        assert arr.actor.megatron.use_dist_checkpointing is False and arr.rollout.n == 1
        assert (arr.actor.ppo_mini_batch_size, arr.actor.ppo_micro_batch_size_per_gpu) == (8, 1)
        assert otc["recompute_granularity"] == ("full" if recompute else None)
        assert arr.model.use_remove_padding is te and (otc["attention_backend"] == "local") is not te


def test_cuda_vs_cpu_comparison_detects_each_kind_of_difference():
    """megatron_device_parity.compare (run on GPUs only) on hand-made results."""
    import torch

    parity = load_helper("megatron_device_parity")
    g = torch.Generator().manual_seed(0)
    cpu = {"logits": torch.randn(2, 8, 16, generator=g), "loss": 2.5,
           "grads": {"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)},
           "adjustments": ["clip_grad", "current_device"]}
    same = dict(cpu, adjustments=[])
    assert all(ok for _, ok, _ in parity.compare(same, cpu))

    def failing(cuda):
        return {name for name, ok, _ in parity.compare(cuda, cpu) if not ok}

    assert failing(dict(same, adjustments=["current_device"])) == {"megatron_cuda_no_cpu_adjustments"}
    assert failing(dict(same, logits=cpu["logits"] + 1e-3)) == {"megatron_cuda_logits"}
    assert failing(dict(same, loss=cpu["loss"] + 1e-4)) == {"megatron_cuda_loss"}
    grads = dict(cpu["grads"], b=cpu["grads"]["b"] * 1.01)
    assert failing(dict(same, grads=grads)) == {"megatron_cuda_grads"}
    assert failing(dict(same, grads={k: v * (1 + 1e-5) for k, v in cpu["grads"].items()})) == set()


def test_bare_gpu_mode_fails_when_no_gpu_is_visible(small_wheelhouse, tmp_path):
    """Without --cpu a node that shows no GPU is a failure (not a run of SKIPs that exits 0)."""
    done = run_script("--bare", "--wheelhouse", str(small_wheelhouse),
                      env={"GRAIL_SELFTEST_DIR": str(tmp_path), "GRAIL_SELFTEST_ONLY": "cuda,throughput",
                           "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2, done.stdout + done.stderr
    assert re.search(r"^  FAIL cuda: torch \S+ \(CUDA build: .*\) sees no GPU", done.stdout, flags=re.M)
    assert "FAIL throughput: skipped, needs cuda" in done.stdout
    assert json.loads((tmp_path / "report.json").read_text())["counts"]["failed"] == 2
