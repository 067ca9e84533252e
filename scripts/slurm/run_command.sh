#!/usr/bin/env bash
# The `--command` payload of train.sbatch: GM_COMMAND run by bash as written, so a compound
# command (`a; b`, `a && b`, pipes) runs whole and its exit status is the last command's; the
# Hydra overrides (this script's arguments) are appended to the last command.
#
#   run_command.sh [overrides...]        (GM_COMMAND from the environment)
#
# Preemption protocol: USR1/TERM sent to this script reach the command that runs at that moment
# (the command runs in its own process group; its shell ignores USR1, so a trainer's handler
# checkpoints and exits 75 while the shell waits for it).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ -n "${GM_COMMAND:-}" ] || gm_die "GM_TRAINER=command needs GM_COMMAND"

set -m   # background jobs get their own process group
# shellcheck disable=SC2016  # "$@" expands in the inner shell
bash -c "trap '' USR1; ${GM_COMMAND} \"\$@\"" gm-payload "$@" &
child=$!
set +m
trap 'kill -USR1 -- "-$child" 2>/dev/null' USR1
trap 'kill -TERM -- "-$child" 2>/dev/null' TERM
gm_wait "$child"
exit $?
