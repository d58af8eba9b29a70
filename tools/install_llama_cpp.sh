#!/bin/sh
# Installs llama-cpp-python VERSION (with its server extra) into the virtual environment of PIP, built for
# this machine's CPU from the PyPI source (tools/llama_cmake_args.py chooses the flags; AMX always off).
# The built wheel is kept in a folder named after the version and the flags, so a rebuilt .venv on the same
# machine installs it in seconds, and a wheel built with other flags (pip's own cache does not tell them
# apart) is never picked up. Usage: tools/install_llama_cpp.sh PIP PYTHON VERSION
set -eu
PIP=$1; PYTHON=$2; VERSION=$3
ARGS=$("$PYTHON" "$(dirname "$0")/llama_cmake_args.py")
KEY=$(printf '%s %s' "$VERSION" "$ARGS" | sha256sum | cut -c1-12)
DIR=${XDG_CACHE_HOME:-$HOME/.cache}/secateurs/llama-cpp-wheels/$VERSION-$KEY
if ! ls "$DIR"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION for this CPU (a few minutes): CMAKE_ARGS=$ARGS"
    rm -rf "$DIR.tmp"
    CMAKE_ARGS="$ARGS" "$PIP" wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -w "$DIR.tmp"
    rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
fi
"$PIP" install -q "$(ls "$DIR"/llama_cpp_python-"$VERSION"-*.whl)[server]"
