#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md in one prepared run, each part capped in time, results as they come:
#
#   throughput  the reference net at 256², batch 16: the reference's plain fp32 loop, then medsynth fit with
#               bf16-mixed, channels_last and torch.compile added one at a time; images/s, MFU, peak memory
#               (train_throughput.py --speedups)
#   memory      whole-volume reconstruction by the 3D autoencoder up to 512³ (ae_memory.py), and BiFlowNet
#               training and generation of 256³ and 512³ volumes (latent3d.py)
#   quality     steps and minutes to 0.8 of the real-image ceiling at 128² on a dataset that is not the demo
#               (recipe_quality.py, seg2d on sagittal4_t2)
#
#   bash benchmarks/gpu/checks.sh                      # throughput and memory (about 6 minutes on an H100/H200)
#   bash benchmarks/gpu/checks.sh quality              # about 5 minutes
#   SMOKE=1 DEVICE=cpu bash benchmarks/gpu/checks.sh throughput memory quality   # rehearsal at tiny sizes
#
# Environment: OUT (default benchmarks/results/gpu: checks.log and one JSON per benchmark), DEVICE (cuda),
# PYTHON (python3), CAP_THROUGHPUT / CAP_MEMORY / CAP_QUALITY (seconds per part). A .gpu/ folder from
# benchmarks/gpu/bundle.sh beside the checkout is installed first (for machines without internet).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
log="$OUT/checks.log"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
if [ -d .gpu/wheels ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/medsynth-site \
        .gpu/wheels/*.whl || exit 1
    export PYTHONPATH="/tmp/medsynth-site:$PWD/.gpu/extra:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    date -u
    "$PY" -c "import torch, lightning, diffusers, monai; print('torch', torch.__version__, 'lightning',
lightning.__version__, 'diffusers', diffusers.__version__, 'monai', monai.__version__);
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" || exit 1
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
        --format=csv,noheader
} 2>&1 | tee -a "$log"

part() {  # part NAME CAP COMMAND...: run one benchmark under a time cap, its output to the log
    local name=$1 cap=$2
    shift 2
    echo "=== $name (cap ${cap}s): $*" | tee -a "$log"
    local t0=$SECONDS
    timeout --kill-after=10 "$cap" "$@" 2>&1 | grep -v -E "Warning|warn\(|^ *$" | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0))s$([ "$rc" = 124 ] && echo ' (time cap reached)')" | tee -a "$log"
}

if [ "$SMOKE" = 1 ]; then
    tp=(--image-size 32 --batch-size 2 --warmup 2 --steps 3 --repeats 1 --variants plain-32 fit-bf16-mixed+channels_last)
    ae=(--sizes 32 64 --channels 8 16 32 --patch 32 --tile 8)
    l3=(--tiny --crop 8 --steps 2 --warmup 1 --repeats 1 --sizes 32 --ddim-steps 2)
    rq=(--image-size 32 --steps 10 20 --judge-steps 20)
else
    tp=(--image-size 256 --reference --speedups --batch-size 16 --warmup 6 --steps 20 --repeats 2)
    ae=(--sizes 128 256 384 512 --precision bf16)
    l3=(--sizes 256 512)
    rq=(--image-size 128 --steps 500 1000 2000)
fi

for p in "${@:-throughput memory}"; do
    for name in $p; do
        case $name in
            throughput)
                part throughput "${CAP_THROUGHPUT:-240}" "$PY" benchmarks/train_throughput.py --device "$DEVICE" \
                    "${tp[@]}" --out "$OUT/throughput.json" ;;
            memory)
                part ae_memory "${CAP_MEMORY:-100}" "$PY" benchmarks/ae_memory.py --device "$DEVICE" "${ae[@]}" \
                    --out "$OUT/ae_memory.json"
                part latent3d "${CAP_MEMORY:-100}" "$PY" benchmarks/latent3d.py --device "$DEVICE" "${l3[@]}" \
                    --out "$OUT/latent3d.json" ;;
            quality)
                part quality "${CAP_QUALITY:-330}" "$PY" benchmarks/recipe_quality.py --datasets sagittal4_t2 \
                    --variants seg2d "${rq[@]}" --flags "--trainer.logger false" --work /tmp/medsynth-quality --out "$OUT/recipe_quality_128.json" ;;
            *) echo "unknown part $name (throughput, memory, quality)" | tee -a "$log"; exit 2 ;;
        esac
    done
done
