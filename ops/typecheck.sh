#!/usr/bin/env bash
# mypy over the sources (as sessionq.*), the tests and ops/, with pyproject.toml's config.
#
#   bash ops/typecheck.sh [mypy options]      (PYTHON=... to use another interpreter)
#
# The repository keeps models/, workers/, scheduler/ and cli.py at its root while they
# import as sessionq.* (pyproject's package-dir mapping). mypy cannot follow setuptools'
# editable-install import hook, so it gets a temporary directory holding one symlink,
# sessionq -> the repository root, on its search path.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
ln -s "$root" "$tmp/sessionq"

cd "$root"
status=0
MYPYPATH="$tmp" "$python" -m mypy --config-file pyproject.toml \
    -p sessionq.models -p sessionq.workers -p sessionq.scheduler -m sessionq.cli -m sessionq.errors \
    -p tests -p ops "$@" >"$tmp/out" 2>&1 || status=$?
# Report the repository's own paths, not the symlink's.
sed "s#$tmp/sessionq/##g" "$tmp/out"
exit "$status"
