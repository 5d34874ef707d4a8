#!/usr/bin/env bash
# GPU check on one H100/H200 (<= 8 minutes, nothing downloaded): prints ONE JSON line on stdout, progress on stderr.
#   bench/gpu_check.sh [--nanochat-dir ~/src/nanochat]   # on the GPU
#   bench/gpu_check.sh --dry-run                         # every branch on CPU at tiny sizes, before spending GPU time
# All logic (and --help) is in bench/gpu_check.py; this only picks the interpreter and keeps the Hub offline.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
# $PYTHON wins; else the repo's .venv; else whatever python3 is on PATH (e.g. a GPU box's own environment)
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi
# offline before Python starts, so no import can reach the Hub (the machine may have no network at all)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
exec "$python" "$here/gpu_check.py" "$@"
