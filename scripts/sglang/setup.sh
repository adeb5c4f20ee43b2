#!/usr/bin/env bash
# Build, or reuse when still valid, the CPU install of SGLang 0.5.23 and the tiny test model.
#
#   usage: scripts/sglang/setup.sh [--model default|partial-utf8]...   (default: both models)
#
# Everything goes to $TRIO_ROUTER_SGLANG_HOME (default ~/.cache/trio-router/sglang), outside
# the repository. The venv is reused while its stamp matches the hash of constraints.txt (and
# of the stand-ins, the interpreter's version and common.sh's RECIPE); a model, while its
# stamp matches the venv's and make_model.py's and the tokenizer's. A half-built venv or model
# has no stamp and is rebuilt. Exit codes: see common.sh (3: SGLang cannot be installed, 4: no
# model).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

models=()
while [ $# -gt 0 ]; do
  case $1 in
    --model) [ $# -ge 2 ] || { say "--model needs a value"; exit $EXIT_USAGE; }; models+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) say "unknown argument $1 (usage: setup.sh [--model default|partial-utf8]...)"; exit $EXIT_USAGE ;;
  esac
done
[ ${#models[@]} -gt 0 ] || models=(default partial-utf8)
for variant in "${models[@]}"; do
  case $variant in
    default|partial-utf8) ;;
    *) say "unknown model $variant (default or partial-utf8)"; exit $EXIT_USAGE ;;
  esac
done

mkdir -p "$SGLANG_HOME"
exec 9>"$SGLANG_HOME/.lock"
flock 9  # engines started together wait for one setup

install_engine() {
  local key version wheels
  version=$("$SGLANG_PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null) ||
    fail $EXIT_NO_ENGINE "cannot run $SGLANG_PYTHON (set TRIO_ROUTER_SGLANG_PYTHON to a CPython 3.11)"
  key=$(venv_key "$version")
  is_current "$VENV/.stamp" "$key" && return 0
  : >"$LOG"
  LOG_STARTED=1
  case $version in
    3.11.*) ;;
    *) fail $EXIT_NO_ENGINE "constraints.txt pins wheels for CPython 3.11, and $SGLANG_PYTHON is $version (set TRIO_ROUTER_SGLANG_PYTHON)" ;;
  esac
  say "installing SGLang 0.5.23 for CPU into $VENV (first time only: a few minutes)"
  rm -rf "$VENV"
  "$SGLANG_PYTHON" -m venv "$VENV" >>"$LOG" 2>&1 || fail $EXIT_NO_ENGINE "cannot create a venv in $VENV"
  local pip=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
  local no_pypi="pip could not install the pinned packages: PyPI unreachable, or a pinned wheel missing for this machine (torch 2.13.0+cpu comes from PyTorch's CPU wheels; add their index with PIP_EXTRA_INDEX_URL if pip cannot find it)"
  "${pip[@]}" install --no-deps "$(grep '^pip==' "$HERE/constraints.txt")" >>"$LOG" 2>&1 ||
    fail $EXIT_NO_ENGINE "$no_pypi"
  "${pip[@]}" install --no-deps -r "$HERE/constraints.txt" >>"$LOG" 2>&1 || fail $EXIT_NO_ENGINE "$no_pypi"
  wheels=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$wheels'" RETURN
  "${pip[@]}" download --no-deps "$SGLANG_KERNEL" -d "$wheels" >>"$LOG" 2>&1 ||
    fail $EXIT_NO_ENGINE "pip could not download $SGLANG_KERNEL (PyPI unreachable?)"
  mkdir -p "$STUBS"
  cp -r "$HERE/stubs/torchvision" "$STUBS/"
  "$VENV/bin/python" "$HERE/cpu_sgl_kernel.py" "$wheels"/sglang_kernel-*.whl "$STUBS" >>"$LOG" 2>&1 ||
    fail $EXIT_NO_ENGINE "cannot unpack $SGLANG_KERNEL"
  SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$STUBS" "$VENV/bin/python" -c \
    'import torch, sgl_kernel, sglang.srt.server_args; assert torch.version.cuda is None, torch.__version__' \
    >>"$LOG" 2>&1 || fail $EXIT_NO_ENGINE "SGLang was installed but does not import on this machine"
  echo "$key" >"$VENV/.stamp"
  say "SGLang is installed ($(du -sh "$VENV" | cut -f1))"
}

build_model() {
  local variant=$1 dir key flags=()
  dir=$(model_dir "$variant")
  key=$(model_key "$variant")
  is_current "$dir/.stamp" "$key" && return 0
  [ -f "$dir/.stamp" ] && echo "rebuilding the $variant model: built for" \
    "[$(tr '\n' ' ' <"$dir/.stamp")], now [$(tr '\n' ' ' <<<"$key")]" >>"$LOG"
  [ "$variant" = partial-utf8 ] && flags=(--partial-utf8)
  LOG_STARTED=1
  rm -rf "$dir"
  PYTHONPATH="$STUBS" "$VENV/bin/python" "$HERE/make_model.py" --out "$dir" \
    --tokenizer "$REPO/trio_router/data/qwen3" "${flags[@]}" >>"$LOG" 2>&1 ||
    fail $EXIT_NO_MODEL "cannot build the test model in $dir"
  echo "$key" >"$dir/.stamp"
}

install_engine
for variant in "${models[@]}"; do
  build_model "$variant"
done
