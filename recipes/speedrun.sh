#!/usr/bin/env bash
# The speedrun: raw text -> tokenizer -> base model -> chat model, with a report card (report.md + plots).
#
#   bash recipes/speedrun.sh                  # GPUs: nanochat's speedrun (d24, ratio 8, ClimbMix); none: --preset tiny
#   bash recipes/speedrun.sh --preset tiny    # offline, CPU, synthetic data: ~9 min on 2 cores
#   bash recipes/speedrun.sh --preset d12     # a quick GPU run (~5 min of pretraining on 8xH100)
#   ACCELERATE_CONFIG=accelerate_configs/zero2_8gpu.yaml bash recipes/speedrun.sh --preset d24   # DeepSpeed ZeRO-2
#
# Stages: data -> tokenizer -> pretrain -> base_eval -> sft -> sft_eval -> (rl -> rl_eval) -> (compression lab:
# distill -> scratch -> sft_distilled -> sft_scratch -> prune -> compress) -> report.
# A finished stage leaves RUN_DIR/stages/<stage>.json and is skipped next time, so after a crash or Ctrl-C the same
# command carries on: pretraining resumes from its last checkpoint (bit-exact), the other stages start over.
#
# Presets (--preset or $PRESET):
#   tiny  d4, vocab 1,024, synthetic data made here (modeling_nanochat/data/synthetic.py), SFT + RL, CPU, fp32
#   cpu   nanochat's runcpu.sh: d6, head_dim 64, T=512, 5,000 steps on 8 ClimbMix shards (needs the Hub)
#   d12   GPU, ratio 12, 40 shards          d20   GPU, ratio 12, 240 shards
#   d24   GPU, nanochat's speedrun: ratio 8, device batch 16, fp8 where supported, 170 shards
# Environment overrides (each optional):
#   RUN_DIR            output root (default runs/speedrun-<preset>)
#   ACCELERATE_CONFIG  accelerate config for GPU stages (default: ddp_8gpu.yaml, single_gpu.yaml on one GPU);
#                      a DeepSpeed one (zero2_8gpu.yaml, zero3_8gpu.yaml) trains with DeepSpeed's Muon instead
#   NPROC              processes per node (default: every GPU)
#   DEPTH VOCAB_SIZE NUM_SHARDS RUN_RL   the preset's dial, tokenizer size, ClimbMix shards, RL stage (0/1)
#   RUN_COMPRESS STUDENT_DEPTH HEAL_STEPS   the compression lab (0/1, default 0: it adds ~15 min to the tiny run;
#                      after a finished run, RUN_COMPRESS=1 with the same command runs only the lab's stages), its
#                      students' depth (DEPTH/2), the pruned model's healing steps (60); it writes
#                      RUN_DIR/compression/compression.{md,png}
#   PRETRAIN_ARGS SFT_ARGS RL_ARGS BASE_EVAL_ARGS CHAT_EVAL_ARGS   extra flags for that stage's recipe
#                      (tiny: one evaluation.chat process scores three task sets, each --also set setting its own
#                      --task/--data/--max-new-tokens/--output; other CHAT_EVAL_ARGS flags, e.g. --limit, reach all)
#   STUDENT_ARGS DISTILL_ARGS COMPRESS_ARGS   the lab's: both students' pretraining (same tokens and steps), the
#                      distillation only (--kd-temperature, --kd-alpha), recipes/compress.py
#   SHARED_DATA        real-format samples (CORE bundle sample, GSM8K rows) scored offline (default ../shared/data)
#   COST_PER_HOUR      $ per hour of this machine for the report (default 3 x GPUs, or 0.10 without a GPU)
set -euo pipefail
{ # the whole script is one compound command, read before it runs: editing this file mid-run cannot derail it
cd "$(dirname "$0")/.."
ROOT=$(pwd)

PRESET=${PRESET:-auto}
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=${2:?--preset needs a value}; shift 2 ;;
    --preset=*) PRESET=${1#*=}; shift ;;
    -h|--help) sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (bash recipes/speedrun.sh [--preset tiny|cpu|d12|d20|d24]; see --help)" >&2
       exit 2 ;;
  esac
done

PY=${PYTHON:-python}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$PRESET" = auto ]; then
  if [ "$NGPU" -gt 0 ]; then PRESET=d24; else PRESET=tiny; fi
  echo "speedrun: --preset $PRESET ($NGPU GPUs found)"
fi

SHARED_DATA=${SHARED_DATA:-$ROOT/../shared/data}
RUN_RL_DEFAULT=0
RUN_COMPRESS_DEFAULT=0
case "$PRESET" in
  tiny)
    DEPTH=${DEPTH:-4}; VOCAB_SIZE=${VOCAB_SIZE:-1024}; RUN_RL_DEFAULT=1
    # the compression lab's students: d2, same tokens and steps for the distilled one and the one from scratch
    PRESET_STUDENT="--max-seq-len 256 --total-batch-size 4096 --device-batch-size 16 --num-iterations 150
      --warmup-steps 10 --eval-every 50 --eval-tokens 16384 --save-every 50 --keep-last 1"
    PRESET_HEAL="--total-batch-size 4096 --device-batch-size 16 --warmup-steps 5 --eval-every -1"
    PRESET_PRETRAIN="--max-seq-len 256 --total-batch-size 4096 --device-batch-size 16 --num-iterations 300
      --warmup-steps 10 --eval-every 50 --eval-tokens 16384 --save-every 50 --keep-last 2 --sample-every -1
      --core-every 100 --core-max-per-task 100"
    PRESET_BASE_EVAL="--bpb-tokens 65536 --device-batch-size 16"
    SFT_CONFIG=recipes/sft/speedrun_tiny.yaml; RL_CONFIG=recipes/grpo/speedrun_tiny.yaml ;;
  cpu)
    DEPTH=${DEPTH:-6}; VOCAB_SIZE=${VOCAB_SIZE:-32768}; NUM_SHARDS=${NUM_SHARDS:-8}
    PRESET_PRETRAIN="--head-dim 64 --window-pattern L --max-seq-len 512 --device-batch-size 32
      --total-batch-size 16384 --eval-every 100 --eval-tokens 524288 --core-every -1 --sample-every 100
      --num-iterations 5000 --save-every 500 --keep-last 2"
    PRESET_BASE_EVAL="--device-batch-size 1 --bpb-tokens 16384 --core-max-per-task 16"
    SFT_CONFIG=recipes/sft/default.yaml; RL_CONFIG=recipes/grpo/default.yaml
    PRESET_SFT="--max-steps 1500 --eval-steps 200 --eval-tokens 524288 --chatcore-every -1 --use-cpu true --bf16 false"
    PRESET_RL="--use-cpu true --bf16 false" ;;
  d12|d20|d24)
    DEPTH=${DEPTH:-${PRESET#d}}; VOCAB_SIZE=${VOCAB_SIZE:-32768}
    case "$PRESET" in
      d12) NUM_SHARDS=${NUM_SHARDS:-40}; PRESET_PRETRAIN="--core-every 999999 --sample-every -1 --save-every 1000" ;;
      d20) NUM_SHARDS=${NUM_SHARDS:-240}; PRESET_PRETRAIN="--save-every 2000" ;;
      d24) NUM_SHARDS=${NUM_SHARDS:-170}
           PRESET_PRETRAIN="--target-param-data-ratio 8 --device-batch-size 16 --save-every 2000"
           if $PY -c "import sys, torch; sys.exit(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)))"
           then PRESET_PRETRAIN="$PRESET_PRETRAIN --fp8"; fi ;;
    esac
    PRESET_BASE_EVAL="--device-batch-size 16"
    SFT_CONFIG=recipes/sft/default.yaml; RL_CONFIG=recipes/grpo/default.yaml ;;
  *) echo "error: unknown preset '$PRESET': use tiny, cpu, d12, d20 or d24" >&2; exit 2 ;;
esac
# How each stage is started: plain python on CPU, accelerate launch over the GPUs otherwise.
if [ "$NGPU" -gt 0 ] && [ "$PRESET" != tiny ] && [ "$PRESET" != cpu ]; then
  NPROC=${NPROC:-$NGPU}
  if [ -z "${ACCELERATE_CONFIG:-}" ]; then
    if [ "$NPROC" -eq 1 ]; then ACCELERATE_CONFIG=accelerate_configs/single_gpu.yaml
    else ACCELERATE_CONFIG=accelerate_configs/ddp_8gpu.yaml; fi
  fi
  LAUNCH=(accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NPROC")
else
  if [ "$PRESET" != tiny ] && [ "$PRESET" != cpu ]; then
    echo "error: --preset $PRESET needs a GPU (none found); use --preset tiny (offline) or --preset cpu" >&2; exit 2
  fi
  NPROC=1; ACCELERATE_CONFIG=none; LAUNCH=($PY)
fi

RUN_RL=${RUN_RL:-$RUN_RL_DEFAULT}
RUN_COMPRESS=${RUN_COMPRESS:-$RUN_COMPRESS_DEFAULT}
RUN_DIR=${RUN_DIR:-runs/speedrun-$PRESET}
mkdir -p "$RUN_DIR/stages" "$RUN_DIR/eval"

# The run's settings, for the report (rewritten each time: a re-run with other overrides says so in the report).
$PY - "$RUN_DIR/speedrun.json" <<EOF
import json, sys, time
json.dump({"preset": "$PRESET", "depth": $DEPTH, "vocab_size": $VOCAB_SIZE, "num_shards": "${NUM_SHARDS:-}",
           "run_rl": $RUN_RL, "run_compress": $RUN_COMPRESS, "gpus": $NGPU, "nproc": $NPROC, "accelerate_config": "$ACCELERATE_CONFIG",
           "cost_per_hour": "${COST_PER_HOUR:-}", "shared_data": "$SHARED_DATA", "updated": time.time()},
          open(sys.argv[1], "w"), indent=2)
EOF

# stage NAME CMD...: run CMD unless RUN_DIR/stages/NAME.json says it finished; record its wall time.
stage() {
  local name=$1; shift
  local marker="$RUN_DIR/stages/$name.json"
  if [ -f "$marker" ]; then echo "== $name: finished earlier ($marker), skipped"; return 0; fi
  echo "== $name: $*"
  echo "$(date +%s)" >> "$RUN_DIR/stages/$name.attempts"
  local t0 t1
  t0=$(date +%s.%N)
  "$@"
  t1=$(date +%s.%N)
  $PY -c "import json, sys; json.dump({'stage': sys.argv[2], 'seconds': float(sys.argv[4]) - float(sys.argv[3]),
    'attempts': len(open(sys.argv[1][:-5] + '.attempts').read().split()), 'finished': float(sys.argv[4])},
    open(sys.argv[1] + '.tmp', 'w'))" "$marker" "$name" "$t0" "$t1"
  mv "$marker.tmp" "$marker"
}

# -- data and tokenizer ------------------------------------------------------------------------------------------
if [ "$PRESET" = tiny ]; then
  DATA=$RUN_DIR/data/pretrain
  stage data $PY -m modeling_nanochat.data.synthetic --output-dir "$RUN_DIR/data"
else
  DATA=climbmix
  stage data $PY -m modeling_nanochat.data.loader --data climbmix -n "$NUM_SHARDS"
fi
TOK_DATA=$DATA  # the tokenizer reads the downloaded shards in name order (train before val) up to its 2B chars
if [ "$DATA" = climbmix ]; then
  TOK_DATA=$($PY -c "from modeling_nanochat.data.sources import default_cache_dir; print(default_cache_dir('climbmix'))")
fi
TOK_TEXT=""  # the compression report's texts: nanochat's defaults, or the synthetic world's own
if [ "$PRESET" = tiny ]; then TOK_TEXT="--text synthetic=$RUN_DIR/data/sample.txt"; fi
stage tokenizer sh -c "$PY recipes/tokenizer.py --data '$TOK_DATA' --vocab-size $VOCAB_SIZE --output-dir '$RUN_DIR/tokenizer' \
  && $PY recipes/tok_eval.py --tokenizer ours='$RUN_DIR/tokenizer' $TOK_TEXT --json '$RUN_DIR/tokenizer/tok_eval.json'"

# -- pretraining and the base model's evaluation --------------------------------------------------------------------
CORE_FLAGS=()
if [ "$PRESET" = tiny ]; then CORE_FLAGS=(--core-bundle "$RUN_DIR/data/core"); fi
# shellcheck disable=SC2086
stage pretrain "${LAUNCH[@]}" recipes/pretrain.py --depth "$DEPTH" --tokenizer "$RUN_DIR/tokenizer" --data "$DATA" \
  --output-dir "$RUN_DIR/base" --resume ${PRESET_PRETRAIN:-} "${CORE_FLAGS[@]}" ${PRETRAIN_ARGS:-}

BUNDLES=()
if [ "$PRESET" = tiny ]; then
  BUNDLES=(--core "synth-core=$RUN_DIR/data/core")
  [ -d "$SHARED_DATA/core_sample" ] && BUNDLES+=(--core "core-sample=$SHARED_DATA/core_sample")
  PROMPTS=(--prompt "The cow says" --prompt "Monday, Tuesday," --prompt "The opposite of hot is"
           --prompt "Anna has 5 apples. She buys 3 more." --prompt "The sky is")
else
  BUNDLES=(--core core=default); PROMPTS=()
fi
# shellcheck disable=SC2086
stage base_eval "${LAUNCH[@]}" recipes/base_eval.py --model "$RUN_DIR/base" --output "$RUN_DIR/eval/base.json" \
  "${BUNDLES[@]}" "${PROMPTS[@]}" ${PRESET_BASE_EVAL:-} ${BASE_EVAL_ARGS:-}

# chat_eval MODEL NAME: the chat tasks of this preset, one JSON per task set under RUN_DIR/eval/
chat_eval() {
  local model=$1 name=$2
  # shellcheck disable=SC2086
  if [ "$PRESET" = tiny ]; then
    # one-sentence answers get 32 new tokens, worked solutions 96 (a three-step one with its tool calls is ~80);
    # one process for the three sets (the model loaded and its decode step compiled once: ~2x per token on CPU)
    local sample=()
    if [ -f "$SHARED_DATA/gsm8k/train_sample.jsonl" ]; then
      sample=(--also "--data '$SHARED_DATA/gsm8k/train_sample.jsonl' --task gsm8k --max-new-tokens 96 --output '$RUN_DIR/eval/$name-gsm8k-sample.json'")
    fi
    $PY -m evaluation.chat --model "$model" --compile --no-progress --data "$RUN_DIR/data/chat_eval" \
      --task synth_chat,mmlu --max-new-tokens 32 --output "$RUN_DIR/eval/$name-synthetic.json" \
      --also "--data '$RUN_DIR/data/chat_eval' --task gsm8k --max-new-tokens 96 --output '$RUN_DIR/eval/$name-synthetic-arith.json'" \
      "${sample[@]}" ${CHAT_EVAL_ARGS:-}
  else
    "${LAUNCH[@]}" -m evaluation.chat --model "$model" --output "$RUN_DIR/eval/$name.json" ${CHAT_EVAL_ARGS:-}
  fi
}
# the base model on the chat tasks too (the tiny run's "before" column; nanochat scores chat models only)
if [ "$PRESET" = tiny ]; then stage base_chat_eval chat_eval "$RUN_DIR/base" base; fi

# -- chat SFT -------------------------------------------------------------------------------------------------------
SFT_DATA=()
if [ "$PRESET" = tiny ]; then
  SFT_DATA=(--data-dir "$RUN_DIR/data/sft" --extra-jsonl "$RUN_DIR/data/sft/tools.jsonl:2")
fi
# shellcheck disable=SC2086
stage sft "${LAUNCH[@]}" recipes/sft.py --config "$SFT_CONFIG" --model-name-or-path "$RUN_DIR/base" \
  --output-dir "$RUN_DIR/sft" "${SFT_DATA[@]}" ${PRESET_SFT:-} ${SFT_ARGS:-}
stage sft_eval chat_eval "$RUN_DIR/sft" sft

# -- chat RL (GRPO on GSM8K; optional as in nanochat) ----------------------------------------------------------------
if [ "$RUN_RL" = 1 ]; then
  RL_DATA=()
  if [ "$PRESET" = tiny ]; then RL_DATA=(--data "$RUN_DIR/data/grpo/train.jsonl"); fi
  # shellcheck disable=SC2086
  stage rl "${LAUNCH[@]}" recipes/grpo.py --config "$RL_CONFIG" --model-name-or-path "$RUN_DIR/sft" \
    --output-dir "$RUN_DIR/rl" "${RL_DATA[@]}" ${PRESET_RL:-} ${RL_ARGS:-}
  stage rl_eval chat_eval "$RUN_DIR/rl" rl
fi

# -- the compression lab (RUN_COMPRESS=1): distill, prune, quantize, measure ---------------------------------------------
if [ "$RUN_COMPRESS" = 1 ]; then
  LAB=$RUN_DIR/compress
  SD=${STUDENT_DEPTH:-$((DEPTH / 2))}
  # shellcheck disable=SC2206
  STUDENT=(--depth "$SD" --tokenizer "$RUN_DIR/tokenizer" --data "$DATA" --resume ${PRESET_STUDENT:-$PRESET_PRETRAIN}
           --core-every -1 --sample-every -1 ${STUDENT_ARGS:-})
  stage distill "${LAUNCH[@]}" recipes/distill.py --teacher "$RUN_DIR/base" --output-dir "$LAB/distilled-d$SD" \
    "${STUDENT[@]}" ${DISTILL_ARGS:-}
  stage scratch "${LAUNCH[@]}" recipes/pretrain.py --output-dir "$LAB/scratch-d$SD" "${STUDENT[@]}"
  for s in distilled scratch; do  # the same chat fine-tuning for both students
    # shellcheck disable=SC2086
    stage "sft_$s" "${LAUNCH[@]}" recipes/sft.py --config "$SFT_CONFIG" --model-name-or-path "$LAB/$s-d$SD" \
      --output-dir "$LAB/$s-d$SD-sft" "${SFT_DATA[@]}" ${PRESET_SFT:-} ${SFT_ARGS:-}
  done
  # shellcheck disable=SC2086
  stage prune $PY recipes/prune.py --model "$RUN_DIR/base" --drop 1 --data "$DATA" --output-dir "$LAB/pruned" \
    --heal-steps "${HEAL_STEPS:-60}" --overwrite -- ${PRESET_HEAL:-}
  LAB_DATA=()
  if [ "$PRESET" = tiny ]; then
    LAB_DATA=(--core "$RUN_DIR/data/core" --chat-data "$RUN_DIR/data/chat_eval")
  fi
  stage compress $PY recipes/compress.py --model "$RUN_DIR/sft" --output-dir "$RUN_DIR/compression" \
    --val-data "$DATA" "${LAB_DATA[@]}" \
    --variant "distilled-d$SD=$LAB/distilled-d$SD-sft:distilled" --variant "scratch-d$SD=$LAB/scratch-d$SD-sft:scratch" \
    --base-variant "teacher-d$DEPTH=$RUN_DIR/base:fp32" --base-variant "pruned-healed=$LAB/pruned/healed:pruned" \
    --base-variant "pruned=$LAB/pruned/pruned:pruned" \
    --base-variant "distilled-d$SD-base=$LAB/distilled-d$SD:distilled" \
    --base-variant "scratch-d$SD-base=$LAB/scratch-d$SD:scratch" ${COMPRESS_ARGS:-}
fi

# -- the report card (always rebuilt: it only reads what the stages wrote) -------------------------------------------
$PY -m modeling_nanochat.apps.report_card "$RUN_DIR"
CHAT_MODEL=$RUN_DIR/sft; [ "$RUN_RL" = 1 ] && CHAT_MODEL=$RUN_DIR/rl
echo "speedrun done: $RUN_DIR/report.md | chat with it: python -m modeling_nanochat.apps.chat $CHAT_MODEL | python app.py --model $CHAT_MODEL"
exit 0
}
