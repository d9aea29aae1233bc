#!/usr/bin/env bash
# Every check that needs a GPU, in one go (under 10 minutes on one H100), then one table.
#
#   bash bench/gpu_suite.sh [DATA_ROOT]     # DATA_ROOT holds cifar-10-batches-py/ (default: .cache/cifar10,
#                                           # built from ../shared/tools/make_cifar10.py when that exists)
# Each check runs under its own time limit; its log is kept in $LOGS (default: a temporary folder)
# and the table gives each check's status and its last line (the figure it measures).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ROOT=${1:-.cache/cifar10}
LOGS=${LOGS:-$(mktemp -d)}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then echo "error: torch sees no CUDA device here" >&2; exit 2; fi
if [ ! -f "$ROOT/cifar-10-batches-py/test_batch" ] && [ -f ../shared/tools/make_cifar10.py ]; then
    $PY ../shared/tools/make_cifar10.py "$ROOT" >/dev/null
fi
HAVE_CIFAR=$([ -f "$ROOT/cifar-10-batches-py/test_batch" ] && echo 1 || echo 0)
WORKERS=1; [ "$GPUS" -ge 2 ] && WORKERS=1,2; [ "$GPUS" -ge 4 ] && WORKERS=1,2,4
ROWS=()

check() {   # check NAME SECONDS NEEDS_CIFAR COMMAND...
    local name=$1 limit=$2 cifar=$3; shift 3
    if [ "$cifar" = 1 ] && [ "$HAVE_CIFAR" = 0 ]; then ROWS+=("$name|skipped|no CIFAR-10 under $ROOT"); return; fi
    local start=$SECONDS
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$? took=$((SECONDS - start))
    local status=ok; [ $rc -eq 124 ] && status="timed out (${limit}s)"; [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed ($rc)"
    ROWS+=("$name|$status ${took}s|$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-110)")
}

# time limits add up to 580 s: the whole suite stays under 10 minutes
check test_cuda 120 0 $PY -m pytest tests/test_cuda.py -q -x -p no:cacheprovider
check vs_avalanche 100 1 $PY bench/vs_avalanche.py --data-root "$ROOT" --device cuda
check overhead 60 1 $PY bench/overhead.py --data-root "$ROOT" --repeats 2
for case in "naive" "naive --compile" "naive --precision bf16-mixed" "derpp"; do
    set -- $case
    name="images_s_$(echo "$case" | tr -d '-' | tr ' ' '_')"
    check "$name" 35 1 $PY bench/scaling.py --scenario split_cifar --data-root "$ROOT" --device cuda \
        --strategy "$@" --workers 1 --epochs 1 --batch-size 128
done
check scaling 80 1 $PY bench/scaling.py --scenario split_cifar --model resnet18 --data-root "$ROOT" --device cuda \
    --workers "$WORKERS" --epochs 1 --batch-size 256
check scaling_dpsgd 80 1 $PY bench/scaling.py --scenario split_cifar --data-root "$ROOT" --device cuda \
    --workers "$WORKERS" --epochs 1 --batch-size 256 --privacy dpsgd

printf '\n%-36s %-22s %s\n' check status "last line of its output (logs: $LOGS)"
for row in "${ROWS[@]}"; do IFS='|' read -r a b c <<<"$row"; printf '%-36s %-22s %s\n' "$a" "$b" "$c"; done
