# shellcheck shell=bash disable=SC2034  # sourced: the variables are used by the scripts
# Shared by setup.sh, launch.sh and relock.sh (sourced, not run).
#
# Where things live (override with the environment):
#   TRIO_ROUTER_SGLANG_HOME    cache directory, default ~/.cache/trio-router/sglang
#   TRIO_ROUTER_SGLANG_PYTHON  interpreter the engine's venv is made from, default python3
#
# Exit codes of these scripts:
#   0  ready
#   2  wrong usage
#   3  SGLang cannot be installed here (Python version, no network, a missing wheel)
#   4  the test model cannot be built
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SGLANG_HOME=${TRIO_ROUTER_SGLANG_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/trio-router/sglang}
SGLANG_PYTHON=${TRIO_ROUTER_SGLANG_PYTHON:-python3}
VENV=$SGLANG_HOME/venv
STUBS=$VENV/trio-router-stubs   # torchvision stand-in and sgl_kernel's Python layer
LOG=$SGLANG_HOME/setup.log
SGLANG_KERNEL=sglang-kernel==0.4.10   # its Python files only (cpu_sgl_kernel.py)
RECIPE=1   # bump when setup.sh installs differently: cached venvs are rebuilt
EXIT_USAGE=2
EXIT_NO_ENGINE=3
EXIT_NO_MODEL=4

say() { echo "trio-router sglang: $*" >&2; }

LOG_STARTED=  # set once this run writes to $LOG: only then does fail() show its tail

# fail CODE MESSAGE: one clear line (and where the details are), then exit CODE
fail() {
  local code=$1
  shift
  say "$*"
  if [ -n "$LOG_STARTED" ] && [ -s "$LOG" ]; then
    say "details: $LOG (last lines below)"
    tail -n 15 "$LOG" | sed 's/^/    /' >&2
  fi
  exit "$code"
}

sha() { sha256sum "$@" | sha256sum | cut -c1-16; }

# venv_key PYTHON_VERSION: the install's key; whatever changes it makes the cached venv stale
venv_key() {
  echo "recipe $RECIPE, $SGLANG_KERNEL"
  (cd "$HERE" && sha constraints.txt cpu_sgl_kernel.py stubs/torchvision/__init__.py)
  echo "$1"
}

# model_dir VARIANT: the checkpoint's directory (its name carries the variant)
model_dir() { echo "$SGLANG_HOME/models/tiny-qwen3-$1"; }

# model_key VARIANT: what the model was made from (the venv: torch and transformers write it)
model_key() {
  local tokenizer=$REPO/trio_router/data/qwen3
  echo "$1"
  cat "$VENV/.stamp"
  sha "$HERE/make_model.py" "$tokenizer/tokenizer.json" "$tokenizer/tokenizer_config.json"
}

# is_current STAMP KEY: the stamp exists and holds KEY
is_current() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
