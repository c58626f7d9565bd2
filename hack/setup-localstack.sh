#!/usr/bin/env bash
# Creates the pinned LocalStack venv (host mode) with berth's extension installed, under
# ${BERTH_CACHE:-~/.cache/berth}. Idempotent: reinstalls only when the pins or the
# extension change.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.env"
cache=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
venv="$cache/localstack-venv-$LOCALSTACK_VERSION"
python=${BERTH_PYTHON:-}
if [ -z "$python" ]; then
  for cand in "$(pyenv root 2>/dev/null)/versions/3.11.7/bin/python3" \
    "$HOME/.pyenv/versions/3.11.7/bin/python3" python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
      "$cand" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
      python=$(command -v "$cand"); break
    fi
  done
fi
[ -n "$python" ] || { echo "[setup-localstack] need CPython 3.11 (set BERTH_PYTHON)" >&2; exit 1; }
stamp=$(cat "$here/../localstack/constraints.txt" "$here"/../localstack/berth_localstack_ext/pyproject.toml \
  "$here"/../localstack/berth_localstack_ext/berth_localstack_ext/*.py | sha256sum | cut -c1-16)
if [ -f "$venv/.berth-stamp" ] && [ "$(cat "$venv/.berth-stamp")" = "$stamp" ]; then
  echo "[setup-localstack] venv up to date: $venv" >&2; exit 0
fi
echo "[setup-localstack] creating $venv with $python" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip >/dev/null
"$venv/bin/pip" install -q -c "$here/../localstack/constraints.txt" \
  "localstack-core[runtime]==$LOCALSTACK_VERSION" cbor2 cryptography pyopenssl service_identity
"$venv/bin/pip" install -q --no-deps --force-reinstall "$here/../localstack/berth_localstack_ext"
echo "$stamp" > "$venv/.berth-stamp"
echo "[setup-localstack] ready: $venv" >&2
