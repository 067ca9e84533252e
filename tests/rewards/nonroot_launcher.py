"""Run a Python script as ``nobody`` (65534), the way a SLURM user runs the trainer.

Usage (as root): ``python nonroot_launcher.py [--no-userns] script.py [args...]``.

Python lives under /root (mode 0700), which ``nobody`` cannot traverse, so the launcher
first gives itself a private mount namespace in which /root is an empty tmpfs with only the
interpreter's prefix and import directories bind-mounted back (the sandbox's own trick,
``sandbox_child.private_mounts_with_import_paths``), then drops to 65534 and execs.

``--no-userns`` simulates a node where unprivileged user namespaces are disabled, honestly:
the script runs in a user namespace whose ``max_user_namespaces`` is 0, so its own
``unshare(CLONE_NEWUSER)`` fails with ENOSPC exactly as on such a host.
"""
from __future__ import annotations

import os
import sys

from grail_megatron.rewards.privileges import NOBODY_GID, NOBODY_UID, drop_to
from grail_megatron.rewards.sandbox_child import private_mounts_with_import_paths


def _enter_userns_without_nesting() -> None:
    """Become root of a new user namespace that maps 0 and 65534 and allows no nested one.
    A multi-line id map must be written from the parent namespace, hence the helper fork."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    helper = os.fork()
    if helper == 0:  # still in the parent namespace: write the maps once the child is in
        os.read(ready_r, 1)
        target = os.getppid()
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{target}/{name}", "w") as handle:
                handle.write(f"0 0 1\n{NOBODY_UID} {NOBODY_UID} 1\n")
        os.write(done_w, b"x")
        os._exit(0)
    os.unshare(os.CLONE_NEWUSER)
    os.write(ready_w, b"x")
    os.read(done_r, 1)
    os.waitpid(helper, 0)
    with open("/proc/sys/user/max_user_namespaces", "w") as handle:
        handle.write("0")


def main(argv: list[str]) -> None:
    no_userns = argv[:1] == ["--no-userns"]
    if no_userns:
        argv = argv[1:]
        _enter_userns_without_nesting()
    # /root stays hidden; only the interpreter (bin, lib, libpython) and sys.path come back.
    private_mounts_with_import_paths([os.path.realpath(sys.base_prefix), *sys.path])
    drop_to(NOBODY_UID, NOBODY_GID)
    assert os.geteuid() == NOBODY_UID
    os.execve(sys.executable, [sys.executable, *argv], dict(os.environ))


if __name__ == "__main__":
    main(sys.argv[1:])
