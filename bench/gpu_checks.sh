#!/usr/bin/env bash
# Every GPU check of the open work in one run, for a short lease of a CUDA machine:
#   bench/gpu_checks.sh MODEL_DIR OUT [WORK]
# MODEL_DIR: the default model converted to safetensors (workers.default_model.convert_default_model).
# 1. the CUDA tests (CUDA-graph decode, compact engine, Sorted Fine-Tuning with exit adapters);
# 2. bench/generate_gpu.py: decode speed per depth with CUDA graphs against HF generate on the same GPU;
# 3. bench.soft_run: answers of the model at full depth to the SFT prompts (the fitting/training text),
#    quality before, Sorted Fine-Tuning with and without jointly trained exit adapters, samples;
# 4. bench.exit_adapters: exit adapters alone (ridge + distillation) on that larger text;
# 5. parity (issue 27): bench/generate_gpu.py on the default model and on the random TinyLlama-1.1B-shaped
#    model (bench/decode_parity.py makes it), Strata against HF eager at batch 1 and 8, and vLLM's full model
#    at batch 1 and 8 where vLLM is installed (bench/vllm_decode.py; skipped otherwise).
# 6. bench.shearing (step "shear", not in the default STEPS): LLM-Shearing at full size, learned masks vs
#    activation scores at 15 % and 50 % removed, healed with and without dynamic batch loading.
# 7. bench/distill_step_by_step.py (step "distill", not in the default STEPS): distilling step-by-step on
#    the bundled shared_traits task with the default model as the student (300 steps a student; issue 29).
# Without a CUDA GPU every step is skipped (the script says so and exits 0).
# Each step has its own time limit (STEP_LIMITS, seconds) so the whole run fits one lease; STEPS picks
# some of them (default: "tests decode soft lens").
set -uo pipefail
MODEL=$1
OUT=$2
WORK=${3:-/tmp/strata-gpu}
read -r T_TESTS T_DECODE T_SOFT T_LENS T_PARITY T_SHEAR T_DISTILL <<<"${STEP_LIMITS:-60 120 270 110 240 600 300}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
SOFT_EXTRA=${SOFT_EXTRA:-}
LENS_EXTRA=${LENS_EXTRA:-}
STEPS=" ${STEPS:-tests decode soft lens} "
want() { [[ $STEPS == *" $1 "* ]]; }
mkdir -p "$OUT" "$WORK"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "no CUDA GPU here: every GPU check skipped" | tee -a "$OUT/log.txt"
  exit 0
fi
[ -e "$WORK/base" ] || ln -s "$(realpath "$MODEL")" "$WORK/base"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) >"$OUT/gpu.txt" 2>&1
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' >>"$OUT/gpu.txt" 2>&1

if want tests; then
  log "tests"
  timeout "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider tests/generation/test_cuda_graphs.py \
    tests/generation/test_compact_engine.py tests/train/test_sorted_ft.py \
    tests/train/test_distill.py::test_a_student_trained_on_a_gpu_is_scored_there >"$OUT/tests.txt" 2>&1
  log "tests rc=$?"
fi

if want decode; then
  log "decode bench"
  timeout "$T_DECODE" "$PY" bench/generate_gpu.py --model "$MODEL" --rounds 2 >"$OUT/generate_gpu.txt" 2>&1
  log "decode bench rc=$?"
fi

if want soft; then
  log "SoFT with and without exit adapters"
  CONFIGS=${CONFIGS:-'[{"lr": 1e-4, "steps": 250, "batch_size": 16, "warmup_steps": 20, "distill": true},
            {"lr": 1e-4, "steps": 250, "batch_size": 16, "warmup_steps": 20, "distill": true,
             "exit_adapters": true, "adapter_lr": 2e-4}]'}
  timeout "$T_SOFT" "$PY" -m bench.soft_run --work "$WORK" --out "$OUT/soft" \
    --stages data,before,train,samples --configs "$CONFIGS" --cut-unfinished $SOFT_EXTRA >>"$OUT/log.txt" 2>&1
  log "SoFT rc=$?"
fi

if want lens; then
  log "exit adapters on the generated text"
  timeout "$T_LENS" "$PY" -m bench.exit_adapters --model "$MODEL" --out "$OUT/lens" --data "$WORK/sft.jsonl" \
    --max-tokens 400000 --distill-exits 15,18,21,24,27 --distill-steps 2000 --distill-batch-tokens 512 \
    --lr 5e-4 --distill-tokens 65536 --sample-exits 15,21,27 $LENS_EXTRA >>"$OUT/log.txt" 2>&1
  log "exit adapters rc=$?"
fi
if want parity; then
  log "parity: the random 1.1B shape, Strata vs HF eager, and vLLM"
  timeout "$T_PARITY" "$PY" -c 'import sys; from pathlib import Path; sys.path.insert(0, "."); \
from bench.decode_parity import random_1b; print(random_1b(Path(sys.argv[1])))' "$WORK" >>"$OUT/log.txt" 2>&1
  timeout "$T_PARITY" "$PY" bench/generate_gpu.py --model "$WORK/random-tinyllama-1.1b" --rounds 2 --batch 8 \
    --new-tokens 64 --check-tokens 4 >"$OUT/generate_gpu_1b.txt" 2>&1
  log "parity 1.1B rc=$?"
  for m in "$MODEL" "$WORK/random-tinyllama-1.1b"; do
    timeout "$T_PARITY" "$PY" bench/vllm_decode.py --model "$m" --batch 8 >>"$OUT/vllm.txt" 2>&1
    log "vllm $m rc=$?"
  done
fi
if want shear; then
  log "LLM-Shearing: learned masks vs activation, with and without DBL"
  timeout "${T_SHEAR:-600}" "$PY" -m bench.shearing --work "$WORK" --device cuda --threads 8 --mask-steps 400 --heal-steps 400 \
    --update-every 50 --eta 0.1,1 --seq-len 256 --heldout-windows 8 --max-tokens 65536 --out "$OUT/shearing.json" \
    >"$OUT/shearing.txt" 2>&1
  log "shearing rc=$?"
fi
if want distill; then
  log "distilling step-by-step, the default model as the student"
  timeout "${T_DISTILL:-300}" "$PY" bench/distill_step_by_step.py --student default --steps 300 --threads 8 \
    --fractions 0.125 0.5 1 \
    --work "$WORK/distill" --json "$OUT/distill_step_by_step.json" >"$OUT/distill_step_by_step.txt" 2>&1
  log "distill rc=$?"
fi
rm -f "$OUT/lens/exit_adapters.safetensors"  # 38 MB; the figures are in results.json
