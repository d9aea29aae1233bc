#!/usr/bin/env bash
# Every check that needs a GPU, in one go (about 8 minutes on one H100 at most), then one table.
#
#   bash bench/gpu_suite.sh [DATA_ROOT]     # DATA_ROOT holds cifar-10-batches-py/ (default: .cache/cifar10,
#                                           # built from ../shared/tools/make_cifar10.py when that exists)
# Each check runs under its own time limit (they add up to 480 s); its log is kept in $LOGS (default: a
# temporary folder) and the table gives each check's status and the lines of its output that hold
# its figures.
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
TABLE_ROW='^ *[0-9]+ +[0-9]+ '   # a row of bench/scaling.py's table

check() {   # check NAME SECONDS NEEDS_CIFAR FIGURES COMMAND...: FIGURES, a grep -E pattern, picks the lines shown
    local name=$1 limit=$2 cifar=$3 figures=$4; shift 4
    if [ "$cifar" = 1 ] && [ "$HAVE_CIFAR" = 0 ]; then ROWS+=("$name|skipped|no CIFAR-10 under $ROOT"); return; fi
    local start=$SECONDS
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$? took=$((SECONDS - start))
    local status=ok; [ $rc -eq 124 ] && status="timed out (${limit}s)"; [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed ($rc)"
    local lines; lines=$(grep -E "$figures" "$LOGS/$name.log")
    [ $rc -ne 0 ] || [ -z "$lines" ] && lines=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1)
    local first=1
    while IFS= read -r line; do
        if [ $first = 1 ]; then ROWS+=("$name|$status ${took}s|${line:0:120}"); first=0; else ROWS+=("||${line:0:120}"); fi
    done <<<"$lines"
}

check test_cuda 90 0 'passed|failed' $PY -m pytest tests/test_cuda.py -q -x -p no:cacheprovider
check vs_avalanche 140 1 'speed-up|difference' $PY bench/vs_avalanche.py --full --data-root "$ROOT" --device cuda
check overhead 90 1 '^ratio' $PY bench/overhead.py --data-root "$ROOT" --device cuda --repeats 2
for case in "naive" "naive --compile" "naive --precision bf16-mixed" "derpp"; do
    set -- $case
    name="images_s_$(echo "$case" | tr -d '-' | tr ' ' '_')"
    check "$name" 25 1 "$TABLE_ROW" $PY bench/scaling.py --scenario split_cifar --data-root "$ROOT" --device cuda \
        --strategy "$@" --workers 1 --epochs 1 --batch-size 128 --warmup
done
check scaling 30 1 "$TABLE_ROW" $PY bench/scaling.py --scenario split_cifar --model resnet18 --data-root "$ROOT" \
    --device cuda --workers "$WORKERS" --epochs 1 --batch-size 256
check scaling_dpsgd 30 1 "$TABLE_ROW" $PY bench/scaling.py --scenario split_cifar --data-root "$ROOT" --device cuda \
    --workers "$WORKERS" --epochs 1 --batch-size 256 --privacy dpsgd

printf '\n%-36s %-20s %s\n' check status "figures (logs: $LOGS)"
for row in "${ROWS[@]}"; do IFS='|' read -r a b c <<<"$row"; printf '%-36s %-20s %s\n' "$a" "$b" "$c"; done
echo "(images_s_* and scaling rows: workers steps train-s steps/s images/s speed-up efficiency ACC RSS-MB GPU-MB)"
