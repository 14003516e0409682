#!/usr/bin/env bash
# The checks that need a GPU, in one script for the day one is lent (one GPU, under 8 minutes):
#   1. logp_gap under bf16 autocast for each supported family's tiny model (2 GRPO steps each; + LoRA);
#      with it the bf16 ratio pi_train / pi_rollout (mean, max, share outside [0.5, 2]; --tis-cap);
#   2. --plan against torch.cuda.max_memory_allocated for Qwen2.5-VL-3B's architecture (random weights), two shapes;
#   3. the 3B benchmark against TRL (one round, 2 timed steps);
# then one table (also in $OUT/gpu_check.md). No network there: TRL and its dependencies come from
# benchmarks/wheels when that folder is carried (pip download -d benchmarks/wheels trl==1.16.0 accelerate datasets
# dill multiprocess xxhash --no-deps); without TRL the benchmark row says so.
#
#     bash benchmarks/gpu_check.sh            # writes to ${OUT:-/tmp/gpu-check}; CHECKS="gap plan bench" picks
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee "$out/versions.txt"
if [ -d benchmarks/wheels ]; then
  pip install -q --no-index --find-links benchmarks/wheels trl==1.16.0 2>&1 | tail -1
fi
for p in peft bitsandbytes; do python -c "import $p" 2>/dev/null || pip install -q --no-index --find-links benchmarks/wheels $p 2>&1 | tail -1; done

checks="${CHECKS:-gap plan bench}"

# 1. logp_gap under bf16, each family (a tiny random model of its real HF class; Qwen2.5-VL: the shipped one)
flags="--steps 2 --eval-every 0 --save-every 0 --sample-every 0 --max-logp-gap -1"
for arch in qwen2_5_vl qwen2_vl qwen3_vl qwen3_5 gemma3 qwen2_5_vl+lora; do
  [[ $checks == *gap* ]] || break
  model="checkpoints/tiny-qwen2.5-vl-rec"
  extra=""
  case $arch in
    qwen2_vl) model="$out/tiny-$arch"; python make_tiny_model.py --arch qwen2_vl --sft-steps 0 --out "$model" > /dev/null 2>&1 ;;
    qwen3_vl|qwen3_5|gemma3) model="$out/tiny-$arch"; python make_tiny_model.py --arch $arch --out "$model" > /dev/null 2>&1 ;;
    qwen2_5_vl+lora) extra="--lora-r 8" ;;
  esac
  timeout 90 python grpo_vlm.py --model "$model" $flags $extra --output-dir "$out/gap-$arch" > "$out/gap-$arch.log" 2>&1 \
    || { echo "gap $arch: failed"; tail -3 "$out/gap-$arch.log"; }
done

# 2. the memory plan against max_memory_allocated, for the 3B architecture
if [[ $checks == *plan* ]]; then
  timeout 240 python benchmarks/memory_plan.py --device cuda --shapes 3b-a,3b-b --json "$out/memory_plan.json" \
    > "$out/memory_plan.log" 2>&1 || echo "memory plan: failed"
  grep -v "^Loading\|it/s" "$out/memory_plan.log"
fi

# 3. one GRPO step of ours against TRL's on the 3B architecture
if [[ $checks == *bench* ]]; then
  timeout 240 python benchmarks/grpo_step_vs_trl.py --model 3b --rounds 1 --steps 2 --warmup 1 \
    --json "$out/gpu_3b.json" > "$out/gpu_3b.log" 2>&1 || echo "3B benchmark: failed or no TRL (see $out/gpu_3b.log)"
  tail -12 "$out/gpu_3b.log"
fi

python benchmarks/gpu_summary.py "$out" | tee "$out/gpu_check.md"
