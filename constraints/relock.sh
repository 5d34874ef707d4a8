#!/usr/bin/env bash
# Re-resolve the whole stack to the newest releases and write constraints/lock.txt from what was installed.
# Then run `bash .ci/run` (it installs from the lock): only a lock that passed CI is committed.
# Torch stays out of the lock: constraints/cpu.txt pins the CPU wheel; on a GPU box, install your torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install -q -U pip
"$venv/bin/pip" install -q -c constraints/cpu.txt -e '.[dev,train,app,serve,compress]'
{
  echo "# The tested stack: every package the README's set-up installs, at the versions CI passed with."
  echo "# Written by constraints/relock.sh on $(date -u +%Y-%m-%d) (python $("$venv/bin/python" -c 'import platform; print(platform.python_version())')); torch is pinned by cpu.txt."
  "$venv/bin/pip" freeze --exclude-editable | grep -viE '^(torch|nanochat-hf)=='
} > constraints/lock.txt
grep -E '^(transformers|trl|accelerate|peft|datasets|tokenizers|huggingface_hub|gradio|deepspeed)==' constraints/lock.txt
rm -rf "$(dirname "$venv")"
