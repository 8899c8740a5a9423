#!/bin/sh
# Create the project's virtualenv. Debian's python3 ships without ensurepip;
# when we are root we install python3-venv, otherwise we say what is missing.
set -eu
PY="$1"; VENV="$2"
if "$PY" -m venv "$VENV" 2>/dev/null; then exit 0; fi
rm -rf "$VENV"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${ver}-venv" || \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
  "$PY" -m venv "$VENV"
else
  echo "error: '$PY -m venv' failed; install python3-venv (apt-get install python3-venv) and retry" >&2
  exit 1
fi
