"""The noise filter hides the expected third-party warnings, and only those."""

from __future__ import annotations

import subprocess
import sys

from grail_megatron.quiet import has_nvidia_gpu

SCRIPT = r"""
import logging, warnings
from grail_megatron.quiet import quiet_third_party
quiet_third_party()
logging.basicConfig()
warnings.warn("Apex is not installed. Falling back to Torch Norm")
warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
warnings.warn("full scope is deprecated. Use empty cuda_graph_modules to capture the whole layer.")
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").warning("MCore's async save is deprecated")
warnings.warn("an unexpected warning the user must see")
logging.getLogger("torch.utils.cpp_extension").warning("an unexpected log line")
"""


def _run(**env) -> str:
    import os

    clean = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # as a user's shell has it
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60,
                         env={**clean, **env})
    assert res.returncode == 0, res.stderr
    return res.stderr


def test_expected_warnings_are_hidden_with_one_summary_line_and_unexpected_ones_show():
    err = _run()
    assert "an unexpected warning the user must see" in err and "an unexpected log line" in err
    assert "full scope is deprecated" not in err and "async save is deprecated" not in err
    summary = [line for line in err.splitlines() if "expected third-party warning(s) hidden" in line]
    assert len(summary) == 1
    if not has_nvidia_gpu():  # the TE/Apex fallbacks are expected only without GPUs
        assert "Apex is not installed" not in err and "No CUDA runtime" not in err
        assert summary[0].startswith("(5 expected")


def test_grail_show_warnings_turns_the_filter_off():
    err = _run(GRAIL_SHOW_WARNINGS="1")
    assert "Apex is not installed" in err and "full scope is deprecated" in err
    assert "hidden" not in err


def test_only_rank_0_prints_the_summary():
    err = _run(RANK="1")
    assert "an unexpected warning the user must see" in err and "hidden" not in err


CHILD = r"""
import subprocess, sys
from grail_megatron.quiet import quiet_third_party
quiet_third_party()
child = ("import warnings; warnings.warn('full scope is deprecated. Use empty cuda_graph_modules'); "
         "warnings.warn('a new warning in a rank')")
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stderr, file=sys.stderr)
"""


def test_processes_started_after_the_filter_inherit_it():
    import os

    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    assert res.returncode == 0, res.stderr
    assert "a new warning in a rank" in res.stderr and "full scope is deprecated" not in res.stderr
