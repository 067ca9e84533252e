"""`grail-megatron convert`: layouts checked before ranks start, clean-up after an interruption."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grail_megatron.cli import main as grail_megatron


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    """A random-init tiny Qwen2: 4 heads, 2 KV heads, 2 layers."""
    from grail_megatron.models.tiny import make_tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("convert")
    texts = [f"what is {a} + {b}? {a + b}" for a in range(20) for b in range(20)]
    train_tokenizer(texts, root / "tokenizer", vocab_size=300)
    return make_tiny_model(root / "hf", tokenizer_dir=root / "tokenizer", heads=4, kv_heads=2, layers=2, hidden=64)


@pytest.fixture(scope="module")
def dist_checkpoint(hf_model) -> Path:
    out = hf_model.parent / "mcore"
    res = subprocess.run([sys.executable, "-m", "grail_megatron.cli", "convert", "from-hf", "--model", str(hf_model),
                          "--out", str(out)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "Apex is not installed" not in res.stderr  # quiet ranks
    assert "from-hf: " in res.stderr  # the progress bar
    return out


def _run(capsys, *argv):
    code = grail_megatron(list(argv))
    return code, *capsys.readouterr()


@pytest.mark.parametrize("flags,needle", [
    (["--tp", "3"], "num_attention_heads=4 is not divisible by --tp 3"),
    (["--tp", "4"], "num_key_value_heads=2 is not divisible by --tp 4"),
    (["--pp", "3"], "num_layers=2 is not divisible by --pp 3"),
])
def test_from_hf_refuses_a_layout_the_model_cannot_take_before_ranks_start(capsys, hf_model, tmp_path, flags, needle):
    started = time.monotonic()
    code, _, err = _run(capsys, "convert", "from-hf", "--model", str(hf_model), "--out", str(tmp_path / "o"), *flags)
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert time.monotonic() - started < 10  # no torchrun (was 39 s and 4 tracebacks)
    assert not (tmp_path / "o").exists()


def test_from_hf_names_a_malformed_config_json(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = _run(capsys, "convert", "from-hf", "--model", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{tmp_path / 'config.json'}: not a readable JSON HF config" in err


def test_to_hf_removes_stale_temp_folders_of_its_out(dist_checkpoint, tmp_path):
    out = tmp_path / "hf"
    stale = tmp_path / f".hf.incomplete-{_dead_pid()}"
    (stale / "x").mkdir(parents=True)
    other = tmp_path / ".other.incomplete-1"  # another --out: left alone
    other.mkdir()
    # in a process of its own: the converter's gloo group must not stay in the test process
    res = subprocess.run([sys.executable, "-m", "grail_megatron.cli", "convert", "to-hf", "--ckpt",
                          str(dist_checkpoint), "--out", str(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())})
    assert res.returncode == 0, res.stderr
    assert (out / "config.json").is_file() and not stale.exists() and other.exists()
    assert "to-hf: " in res.stderr  # the progress bar


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_to_hf_leaves_no_temp_folder(dist_checkpoint, tmp_path, sig):
    out = tmp_path / "hf"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.Popen([sys.executable, "-m", "grail_megatron.cli", "convert", "to-hf", "--ckpt",
                             str(dist_checkpoint), "--out", str(out), "--verify", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".hf.incomplete-*")):  # the conversion is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "partial output removed" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the temp folder nor a half-published --out


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
