"""Which confinement the MBPP sandbox uses, and the loud error when none is possible.

Two backends, one set of guarantees (``docs/rewards.md``, "The MBPP sandbox"):

* ``root``: the zygote runs as uid 0 and switches every test to ``nobody`` (65534);
* ``userns``: the zygote is not root (a SLURM or shared GPU node) and enters an
  unprivileged user namespace that maps only its own uid; each test gets the same
  namespaces, a read-only view of the file system with the caller's private directories
  hidden, and no capabilities.

``GRAIL_SANDBOX_MODE`` (``auto``, the default: ``root`` as uid 0, else ``userns``) forces a
backend. When the chosen backend cannot start, the pool raises ``SandboxUnavailable`` with
the message of ``unavailable_message``; MBPP scoring then stops with that error unless the
caller explicitly accepts format-only MBPP rewards (``format_only_allowed``).
"""
from __future__ import annotations

import os
import pwd

MODE_ENV = "GRAIL_SANDBOX_MODE"
FORMAT_ONLY_ENV = "GRAIL_ALLOW_FORMAT_ONLY_MBPP"
NO_SYMPY_ENV = "GRAIL_ALLOW_NO_SYMPY"
HIDE_ENV = "GRAIL_SANDBOX_HIDE"
MODES = ("auto", "root", "userns")
# Hidden from tests in ``userns`` mode, in addition to the caller's home (and anything in
# GRAIL_SANDBOX_HIDE): other homes, root's, and /run (sockets of D-Bus, Docker, ...).
DEFAULT_HIDDEN_DIRS = ("/home", "/root", "/run")
UNAVAILABLE_PREFIX = "MBPP sandbox unavailable: "
SYMPY_UNAVAILABLE_PREFIX = "sympy sandbox unavailable: "

_FIXES = (
    "enable unprivileged user namespaces (`sysctl -w user.max_user_namespaces=15000`; "
    "Debian and Ubuntu before 24.04 also need `sysctl -w kernel.unprivileged_userns_clone=1`, "
    "Ubuntu 24.04+ `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`; "
    "in a container, allow the unshare/mount syscalls in its seccomp profile), "
    "or run the reward workers as root"
)
_OPT_OUT = (
    f"to accept MBPP rewards made of the format terms only (pass rate 0), set {FORMAT_ONLY_ENV}=1 "
    "or pass allow_format_only_mbpp=True"
)


def resolve_mode(requested: str | None = None) -> str:
    """``root`` or ``userns`` for ``requested``; ``None``/``auto`` defer to
    ``$GRAIL_SANDBOX_MODE`` (the operator's knob), whose own default is auto."""
    if requested in (None, "", "auto"):
        requested = os.environ.get(MODE_ENV) or "auto"
    mode = requested.strip().lower()
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        return "root" if os.geteuid() == 0 else "userns"
    return mode


_SYMPY_OPT_OUT = (
    f"to score MATH without the sympy strategy (exact and numeric comparisons only, a departure "
    f"from GRAIL parity), set {NO_SYMPY_ENV}=1"
)


def sympy_unavailable_message(detail: str) -> str:
    """The sympy worker's version of ``unavailable_message`` (it evaluates model answers)."""
    return (f"{SYMPY_UNAVAILABLE_PREFIX}uid {os.geteuid()} cannot create an unprivileged user "
            f"namespace ({detail}), so model answers cannot be parsed in confinement. "
            f"Fix: {_FIXES}. Or, {_SYMPY_OPT_OUT}.")


def no_sympy_allowed() -> bool:
    """The explicit opt-in to run MATH scoring without the sympy worker."""
    return os.environ.get(NO_SYMPY_ENV, "").strip().lower() in {"1", "true", "yes"}


def unavailable_message(mode: str, detail: str) -> str:
    """One line: what is missing, how to fix it, how to opt out explicitly."""
    if mode == "root":
        what = f"the root backend needs uid 0 with CAP_SYS_ADMIN for namespaces and mounts ({detail})"
        fix = (f"give the container CAP_SYS_ADMIN and a seccomp profile that allows unshare and mount "
               f"(e.g. docker run --cap-add SYS_ADMIN --security-opt seccomp=unconfined), or run the "
               f"reward workers as an ordinary user with unprivileged user namespaces enabled "
               f"({MODE_ENV}=userns is picked automatically then)")
    else:
        what = (f"uid {os.geteuid()} cannot create an unprivileged user namespace with its own "
                f"mount, PID and network namespaces ({detail}), so model-written code cannot be confined")
        fix = _FIXES
    return f"{UNAVAILABLE_PREFIX}{what}. Fix: {fix}. Or, {_OPT_OUT}."


def explain_os_error(exc: OSError) -> str:
    """The error of a failed unshare/mount, with what usually causes it."""
    import errno

    hints = {
        errno.ENOSPC: "the user namespace limit is reached: user.max_user_namespaces is 0 here",
        errno.EPERM: "no CAP_SYS_ADMIN, or forbidden by a sysctl, an AppArmor/SELinux policy or a seccomp filter",
        errno.EINVAL: "the kernel lacks CONFIG_USER_NS",
    }
    hint = hints.get(exc.errno)
    return f"{type(exc).__name__}: {exc}" + (f"; {hint}" if hint else "")


def format_only_allowed(explicit: bool | None = None) -> bool:
    """The explicit opt-in to score MBPP without running the tests (never the default)."""
    if explicit is not None:
        return explicit
    return os.environ.get(FORMAT_ONLY_ENV, "").strip().lower() in {"1", "true", "yes"}


def hidden_dirs(extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Directories covered by an empty tmpfs in ``userns`` mode (import dirs inside them
    are bind-mounted back read-only): the defaults, the caller's home, ``$GRAIL_SANDBOX_HIDE``
    (``:``-separated) and ``extra``."""
    homes = {os.environ.get("HOME", "")}
    try:
        homes.add(pwd.getpwuid(os.geteuid()).pw_dir)
    except KeyError:  # a uid without a passwd entry (some container runtimes)
        pass
    configured = os.environ.get(HIDE_ENV, "").split(":")
    found: list[str] = []
    for path in (*DEFAULT_HIDDEN_DIRS, *sorted(homes), *configured, *extra):
        real = os.path.realpath(path) if path else ""
        if real and real != "/" and os.path.isdir(real) and real not in found:
            found.append(real)
    return tuple(found)
