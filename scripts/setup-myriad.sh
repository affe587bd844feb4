#!/usr/bin/env bash
# Builds the NCS2 (MYRIAD) compiler environment .venv-myriad, which core/ncs2_compiler.py uses to
# compile every export into an NCS2 .blob with Intel's own compiler (see docs/ncs2.md).
#
#   .venv-myriad/            Python 3.6-3.9 venv with openvino==2021.4.2, the last PyPI wheel that
#                            ships the MYRIAD plugin (Intel's proprietary licence: installed here,
#                            never committed)
#   .venv-myriad/myriad_shim.so  built from core/myriad_shim.cpp with g++
#   .venv-myriad/status.json     {"ok": true|false, "reason": ..., ...}: what the app and tests read
#
# Run by `make setup` / `make test` / `make run`. When no Python <= 3.9 exists (or g++, libusb or the
# wheel cannot be had) it says so in one line, writes status.json with ok=false and the reason, and
# exits 0: PruneScope then works without the compiler and says "not verified by the NCS2 compiler".
# Override the interpreter with MYRIAD_PYTHON=/path/to/python3.9 (MYRIAD_PYTHON=none: do not set the
# compiler up), the venv's place with MYRIAD_VENV (default .venv-myriad).
set -u
cd "$(dirname "$0")/.."
VENV=${MYRIAD_VENV:-.venv-myriad}
STATUS=$VENV/status.json
OPENVINO_VERSION=2021.4.2

say() { echo "setup-myriad: $*" >&2; }

give_up() {  # one line, a status file with the reason, exit 0 (the rest of the set-up goes on)
    mkdir -p "$VENV"
    printf '{"ok": false, "reason": "%s"}\n' "$(echo "$1" | sed 's/"/\\"/g')" > "$STATUS"
    say "NCS2 compiler NOT set up: $1. Exports will read \"not verified by the NCS2 compiler (static check only)\"."
    exit 0
}

# ---------------------------------------------------------------- a Python 3.6 .. 3.9
py_ok() {  # $1 can run and is 3.6 <= version <= 3.9
    [ -n "$1" ] && [ -x "$1" ] && "$1" -c 'import sys; sys.exit(0 if (3, 6) <= sys.version_info[:2] <= (3, 9) else 1)' 2>/dev/null
}
find_python() {
    [ "${MYRIAD_PYTHON:-}" = none ] && return
    if [ -n "${MYRIAD_PYTHON:-}" ]; then
        py_ok "$MYRIAD_PYTHON" && { echo "$MYRIAD_PYTHON"; return; }
        say "MYRIAD_PYTHON=$MYRIAD_PYTHON is not a Python 3.6-3.9; looking elsewhere"
    fi
    local roots=("${PYENV_ROOT:-}" "$HOME/.pyenv" /root/.pyenv /opt/pyenv)
    local c
    for minor in 9 8 7 6; do
        c=$(command -v "python3.$minor" 2>/dev/null) && py_ok "$c" && { echo "$c"; return; }
        for r in "${roots[@]}"; do
            [ -n "$r" ] || continue
            for c in "$r"/versions/3."$minor".*/bin/python3."$minor"; do
                py_ok "$c" && { echo "$c"; return; }
            done
        done
    done
}

PY=$(find_python)
[ "${MYRIAD_PYTHON:-}" = none ] && give_up "MYRIAD_PYTHON=none: the set-up was told not to build it"
[ -n "$PY" ] || give_up "no Python 3.6-3.9 found (openvino $OPENVINO_VERSION, the last wheel with the MYRIAD plugin, needs one; install e.g. 'pyenv install 3.9' or set MYRIAD_PYTHON)"
command -v g++ >/dev/null 2>&1 || give_up "no g++ to build core/myriad_shim.cpp (apt-get install g++)"

# ---------------------------------------------------------------- libusb-1.0 (the plugin links it)
if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
    say "libusb-1.0-0 is missing; installing it with apt-get"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    if ! { $SUDO apt-get install -y --no-install-recommends libusb-1.0-0 >/dev/null 2>&1 \
           || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y --no-install-recommends libusb-1.0-0 >/dev/null 2>&1; }; }; then
        give_up "libusb-1.0-0 (Debian package) is missing and apt-get could not install it; install it and rerun make setup"
    fi
fi

# ---------------------------------------------------------------- the venv with openvino 2021.4.2
if [ ! -x "$VENV/bin/python" ] || ! py_ok "$VENV/bin/python"; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV" || give_up "$PY -m venv failed"
fi
if ! "$VENV/bin/python" -c "import openvino.inference_engine as ie, sys; sys.exit(0 if ie.__version__.startswith('2021.4.2') else 1)" 2>/dev/null; then
    say "installing openvino==$OPENVINO_VERSION (with its MYRIAD plugin, ~176 MB) into $VENV"
    "$VENV/bin/python" -m pip install --quiet "openvino==$OPENVINO_VERSION" \
        || give_up "pip could not install openvino==$OPENVINO_VERSION into $VENV"
fi

# ---------------------------------------------------------------- the shim
g++ -shared -fPIC -O2 -o "$VENV/myriad_shim.so" core/myriad_shim.cpp || give_up "g++ could not build core/myriad_shim.cpp"

# ---------------------------------------------------------------- prove it: compile a tiny network
rm -f "$STATUS"
if ! out=$("$VENV/bin/python" core/myriad_worker.py selftest 2>/dev/null); then
    give_up "the MYRIAD compiler did not compile a test network ($(echo "$out" | tail -c 300))"
fi
echo "$out" > "$STATUS"
say "NCS2 compiler ready: $(echo "$out" | "$VENV/bin/python" -c 'import json,sys; d=json.load(sys.stdin); print(d["compiler"] + ", test blob " + str(d["blob_bytes"]) + " bytes, " + str(d["stages"]) + " stages")')"
