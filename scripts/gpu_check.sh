#!/usr/bin/env bash
# The GPU measurements, on one GPU (a lent H100 or H200 here; any CUDA machine with torch works).
# Random weights with Qwen2.5-VL-3B's dimensions, bf16, nothing downloaded. Three sections:
#
#   bench    grpo_min vs TRL's GRPOTrainer (scripts/bench_vs_trl.py, which runs scripts/bench.py and
#            scripts/trl_driver.py): 8 completions x 256 tokens, beta 0.04, 448 px images, 1 and 4
#            prompts per step; tokens per second and peak GPU memory.
#   compile  grpo_min again with --compile-generation (each decode step replayed as one CUDA graph over a
#            KV cache of fixed size), same model folder and settings (scripts/bench.py directly), then one table:
#            ours without / with --compile-generation / TRL, from this section and the bench section.
#   train    train.py for a few steps under torchrun on the one GPU, with DDP and with --fsdp (FSDP2):
#            step time and peak GPU memory from metrics.jsonl.
#   lora     LoRA r 64 on the same model, bf16 base, with and without gradient checkpointing, and full
#            fine-tuning on the same card (scripts/bench.py): peak GPU memory and step time.
#
#   OUT=runs/gpu_check bash scripts/gpu_check.sh                            # all four
#   OUT=runs/gpu_check SECTIONS="bench compile" bash scripts/gpu_check.sh   # ours with and without compiled
#                                                                           # decoding vs TRL, in one call
#   OUT=runs/gpu_check SECTIONS=train bash scripts/gpu_check.sh
#
# Time (estimates: the H200 runs of 2026-11-28 predate compiled decoding): bench up to 5.5 minutes (its
# timeout), compile about 1 minute per run plus compiling, once per run (never measured: the timeout allows
# 200 s a run), train up to 4. Where one call may run 10 minutes, "bench compile" fits only if compiling
# takes about a minute; otherwise run SECTIONS=bench, SECTIONS=compile and SECTIONS=train as three calls.
# TRL is not part of the project: where the machine lacks it, put its wheels (and transformers 5.24.0,
# datasets, dill, multiprocess) in .whl/ and they are installed into /tmp/site first.
# Results go to $OUT: env.txt, bench.txt (its table at the end), bench_results.jsonl, bench_log.txt,
# compile.txt (the three-way table), compile-{1,4}.txt (each run's log), train.txt and train-{ddp,fsdp}.jsonl.
set -u
OUT=${OUT:-runs/gpu_check}
SECTIONS=${SECTIONS:-bench compile train lora}
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GRPO_MIN_CACHE=${GRPO_MIN_CACHE:-/tmp/grpo_min_cache}
# Overridable for a dry run on a CPU: MODEL_CONFIG=tiny DTYPE=float32 LENGTH=16 SIZE=112 bash scripts/gpu_check.sh
MODEL_CONFIG=${MODEL_CONFIG:-3b} DTYPE=${DTYPE:-bfloat16} LENGTH=${LENGTH:-256} SIZE=${SIZE:-448}
STEPS=${STEPS:-3} TRAIN_STEPS=${TRAIN_STEPS:-3}
has() { case " $SECTIONS " in *" $1 "*) return 0;; *) return 1;; esac; }
model_folder() {  # the random-weight model folder, written once by scripts/bench_vs_trl.py (or here, first)
    python3 -c "import sys; sys.path.insert(0, 'scripts'); from bench_vs_trl import model_folder
print(model_folder('$MODEL_CONFIG', dtype='$DTYPE'))" | tail -n 1
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  python3 -c "import trl, datasets, pyarrow; print('trl', trl.__version__, 'datasets', datasets.__version__,
'pyarrow', pyarrow.__version__)"; } 2>&1 | tee "$OUT/env.txt"

if has bench; then
    echo "== bench: grpo_min vs TRL, $MODEL_CONFIG-sized, $DTYPE, 8 x $LENGTH tokens, $SIZE px, 1 and 4 prompts per step"
    timeout ${BENCH_TIMEOUT:-330} python3 scripts/bench_vs_trl.py --models "$MODEL_CONFIG" --dtype "$DTYPE" \
        --max-completion-length "$LENGTH" --batch-sizes 1 4 --sizes "$SIZE" --runs 1 --steps "$STEPS" --trl-python python3 \
        --out /tmp/bench_vs_trl --timeout 150 2>&1 | tee "$OUT/bench.txt"
    cp /tmp/bench_vs_trl/results.jsonl "$OUT/bench_results.jsonl" 2>/dev/null
    cp /tmp/bench_vs_trl/log.txt "$OUT/bench_log.txt" 2>/dev/null
fi

if has compile; then
    echo "== compile: grpo_min with --compile-generation, same settings" | tee "$OUT/compile.txt"
    MODEL=$(model_folder)
    for B in 1 4; do
        timeout ${COMPILE_TIMEOUT:-200} python3 scripts/bench.py --model "$MODEL" --dtype "$DTYPE" --num-generations 8 \
            --max-completion-length "$LENGTH" --beta 0.04 --batch-size "$B" --image-size "$SIZE" --steps "$STEPS" \
            --compile-generation 2>&1 | tee "$OUT/compile-$B.txt"  # its last line is the JSON result
    done
    python3 - "$OUT" <<'EOF' 2>&1 | tee -a "$OUT/compile.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def last_json(path):
    try:
        return json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        return None
rows = {}
if (out / "bench_results.jsonl").exists():
    for line in (out / "bench_results.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["batch_size"]] = r
print("\n| prompts | ours tok/s | ours compiled tok/s | TRL tok/s | ours generate s | ours compiled generate s | "
      "ours peak GPU MB | ours compiled peak GPU MB |")
print("|---|---|---|---|---|---|---|---|")
for B in (1, 4):
    c, r = last_json(out / f"compile-{B}.txt"), rows.get(B, {})
    cell = lambda d, k, f="{:.1f}": "-" if not d or d.get(k) is None else f.format(d[k])
    print(f"| {B} | {cell(r, 'ours_completion_tokens_per_s')} | {cell(c, 'completion_tokens_per_s')} | "
          f"{cell(r, 'trl_completion_tokens_per_s')} | {cell(r, 'ours_generate_s', '{:.2f}')} | "
          f"{cell(c, 'generate_s', '{:.2f}')} | {cell(r, 'ours_peak_gpu_mb', '{:.0f}')} | {cell(c, 'peak_gpu_mb', '{:.0f}')} |")
EOF
fi

if has train; then
    echo "== train: train.py on one GPU, DDP and FSDP2 (torchrun --nproc_per_node=1)"
    MODEL=$(model_folder)
    for mode in ddp fsdp; do
        extra=""; [ "$mode" = fsdp ] && extra="--fsdp"
        timeout ${TRAIN_TIMEOUT:-120} python3 -m torch.distributed.run --nproc_per_node=1 train.py --model "$MODEL" --dtype "$DTYPE" \
            --max-steps "$TRAIN_STEPS" --batch-size 1 --num-generations 8 --max-completion-length "$LENGTH" --eval-steps 0 \
            --eval-limit 8 --semantic-model none --output-dir "/tmp/train-$mode" --overwrite $extra 2>&1 | tail -n 25 | tee -a "$OUT/train.txt"
        cp "/tmp/train-$mode/metrics.jsonl" "$OUT/train-$mode.jsonl" 2>/dev/null
        python3 - "$mode" "/tmp/train-$mode/metrics.jsonl" <<'EOF' 2>&1 | tee -a "$OUT/train.txt"
import json, statistics, sys
mode, path = sys.argv[1:]
try:
    rows = [json.loads(l) for l in open(path)]
except OSError:
    sys.exit(f"{mode}: no metrics.jsonl")
later = rows[1:] or rows  # the first step includes CUDA/compile warm-up
print(f"train.py {mode}: {len(rows)} steps, median step {statistics.median(r['step_time_s'] for r in later):.2f} s "
      f"(generate {statistics.median(r['generate_s'] for r in later):.2f} s), peak GPU "
      f"{max(r.get('peak_gpu_mb', 0) for r in rows) / 1024:.1f} GiB, {rows[-1]['completion_tokens']} completion tokens/step")
EOF
    done
fi

# ======================================================================================= BEGIN LoRA block
# lora: LoRA (train.py --lora-r): r 64 on a random model with Qwen2.5-VL-3B's dimensions, the frozen base in bf16,
#    float32 adapters and AdamW state, the reference = the base with its adapters off (no second copy). One GPU,
#    scripts/bench.py (train.py's grpo_step and policy preparation), the settings of section 1 at 1 prompt per
#    step (G 8, $LENGTH tokens, $SIZE px, beta 0.04): with and without --gradient-checkpointing, then full
#    fine-tuning with the same flags on the same card as the baseline. Peak GPU memory and seconds per step
#    land in $OUT/lora.txt (summary table at its end) and $OUT/lora.jsonl; scripts/lora_memory.py's counted
#    weights + optimizer table (no activations) in $OUT/lora_memory.txt. Self-contained: it needs only the
#    variables set at the top of this file, so it can also be run alone:
#      sed -n '/^# =* BEGIN LoRA/,/^# =* END LoRA/p' scripts/gpu_check.sh > /tmp/lora_check.sh
#      OUT=runs/gpu_check MODEL_CONFIG=3b DTYPE=bfloat16 LENGTH=256 SIZE=448 STEPS=3 bash /tmp/lora_check.sh
if has lora; then
echo "== lora: LoRA r 64, $MODEL_CONFIG-sized, $DTYPE base, one GPU: bench.py with and without gradient checkpointing, full FT baseline"
mkdir -p "$OUT"
python3 scripts/lora_memory.py --lora-r 64 2>&1 | tee "$OUT/lora_memory.txt"
: > "$OUT/lora.jsonl"
for variant in "lora" "lora-gc" "full"; do
    case $variant in
        lora) extra="--lora-r 64" ;;
        lora-gc) extra="--lora-r 64 --gradient-checkpointing" ;;
        full) extra="" ;;
    esac
    echo "-- $variant: scripts/bench.py --model-config $MODEL_CONFIG $extra" | tee -a "$OUT/lora.txt"
    timeout ${LORA_TIMEOUT:-240} python3 scripts/bench.py --model-config "$MODEL_CONFIG" --dtype "$DTYPE" $extra \
        --image-size "$SIZE" --num-generations 8 --max-completion-length "$LENGTH" --beta 0.04 --batch-size 1 \
        --steps "$STEPS" > "/tmp/lora-$variant.txt" 2>&1
    echo "exit code $?" >> "/tmp/lora-$variant.txt"
    tail -n 14 "/tmp/lora-$variant.txt" | tee -a "$OUT/lora.txt"
    tail -n 2 "/tmp/lora-$variant.txt" | head -n 1 | grep '^{' | python3 -c "import json, sys
print(json.dumps({'variant': '$variant', **json.loads(sys.stdin.read())}))" >> "$OUT/lora.jsonl" 2>/dev/null
done
python3 - "$OUT/lora.jsonl" <<'PYEOF' 2>&1 | tee -a "$OUT/lora.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| variant | trained M params | peak GPU GiB | s/step | generate s | policy s | reference s | tokens/step |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['variant']} | {r['trained_parameters_m']:.1f} | {r.get('peak_gpu_mb', float('nan')) / 1024:.1f} | "
          f"{r['seconds_per_step']:.2f} | {r['generate_s']:.2f} | {r['policy_s']:.2f} | {r['reference_s']:.2f} | "
          f"{r['completion_tokens_per_step']:.0f} |")
missing = {"lora", "lora-gc", "full"} - {r["variant"] for r in rows}
if missing:
    print(f"no result for {sorted(missing)} (out of memory or timed out: see the lines above)")
PYEOF
fi
# ========================================================================================= END LoRA block
