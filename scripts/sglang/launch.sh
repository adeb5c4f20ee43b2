#!/usr/bin/env bash
# Start a real SGLang 0.5.23 on the CPU, serving the tiny test model, in the foreground.
#
#   usage: scripts/sglang/launch.sh [--model default|partial-utf8] PORT [sglang options...]
#
# Runs setup.sh first (a few minutes the first time, a second once cached), then replaces
# itself with the server, so the PID you started is the engine's (stop it with SIGTERM).
# Ready in ~35 s, when GET /health answers 200 (SGLang's /health runs a one-token generation
# and takes at least a second). Options after PORT go to sglang.launch_server. The exit code
# is setup.sh's when it fails (see common.sh), else the server's.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

variant=default
if [ "${1:-}" = --model ]; then
  variant=${2:?--model needs a value}
  shift 2
fi
case ${1:-} in
  ''|-*) say "usage: launch.sh [--model default|partial-utf8] PORT [sglang options...]"; exit $EXIT_USAGE ;;
esac
port=$1
shift
"$HERE/setup.sh" --model "$variant" || exit $?

export SGLANG_USE_CPU_ENGINE=1  # without it SGLang's is_cpu() is false and it takes CUDA paths
export PYTHONPATH="$STUBS${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" -m sglang.launch_server \
  --model-path "$(model_dir "$variant")" --host 127.0.0.1 --port "$port" \
  --device cpu --dtype bfloat16 --attention-backend torch_native --sampling-backend pytorch \
  --disable-cuda-graph --skip-server-warmup --max-total-tokens 65536 --weight-version v0 "$@"
