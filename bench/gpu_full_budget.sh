#!/usr/bin/env bash
# The full-budget rows of the Seq-Tiny-ImageNet (DER Table 2) and Split CIFAR-100 (van de Ven et al.
# 2022, X-DER, Avalanche's GEM) presets in one call on a GPU machine with internet (datasets download into DATA_ROOT on first
# use) or with DATA_ROOT already filled. Results: OUT/reproduce.json and the printed table; copy the
# figures into docs/results.yaml with the machine and date.
#   bash bench/gpu_full_budget.sh [DATA_ROOT] [OUT] [SEEDS]
set -euo pipefail
DATA_ROOT=${1:-$HOME/.cache/clsim/data}
OUT=${2:-runs/full-budget}
SEEDS=${3:-0}
cd "$(dirname "$0")/.."
python bench/data_load.py --data-root "$DATA_ROOT" --mnist-root "$DATA_ROOT" --device cuda
python bench/reproduce.py --match der-seqtinyimg --budget 1 --seeds "$SEEDS" --device cuda \
    --data-root "$DATA_ROOT" --out "$OUT/der-seqtinyimg"
python bench/reproduce.py --match vdv2022-splitcifar100 --budget 1 --seeds "$SEEDS" --device cuda \
    --data-root "$DATA_ROOT" --out "$OUT/vdv2022-splitcifar100"
python bench/reproduce.py --match xder-seqcifar100 --budget 1 --seeds "$SEEDS" --device cuda \
    --data-root "$DATA_ROOT" --out "$OUT/xder-seqcifar100"
python bench/reproduce.py --match avalanche-scifar100 --budget 1 --seeds "$SEEDS" --device cuda \
    --data-root "$DATA_ROOT" --out "$OUT/avalanche-scifar100"
