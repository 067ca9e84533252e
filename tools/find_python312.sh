#!/usr/bin/env bash
# Prints the path of a working Python 3.12 interpreter (pyenv shims can exist without
# working, so each candidate is run, not just looked up).
for c in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12 python3; do
  [ -n "$c" ] || continue
  if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
    command -v "$c" 2>/dev/null || echo "$c"
    exit 0
  fi
done
echo "no working Python 3.12 found: install it or set PYTHON312=/path/to/python3.12" >&2
exit 1
