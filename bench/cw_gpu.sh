#!/usr/bin/env bash
# Continual World's full protocol (sweeps/cw20.yaml) on one GPU machine: every trial runs its SAC
# updates on the GPU (--device cuda) while Meta-World steps on a CPU core; Ray runs one trial per
# CPU core (WORKERS, default all of them), so a 16-core box runs 16 trials side by side. Resumable:
# run it again and finished trials are skipped. The report lands in $OUT/cw20/report/report.md.
#   OUT=/data/sweeps WORKERS=14 bash bench/cw_gpu.sh
set -euo pipefail
OUT=${OUT:-sweeps}
WORKERS=${WORKERS:-$(nproc)}
mkdir -p "$OUT"
python - "$OUT/cw20_gpu.yaml" <<'PY'
import sys, yaml
spec = yaml.safe_load(open("sweeps/cw20.yaml"))
spec["name"] = "cw20"
spec["base"]["device"] = "cuda"
yaml.safe_dump(spec, open(sys.argv[1], "w"), sort_keys=False)
PY
clsim sweep "$OUT/cw20_gpu.yaml" --out "$OUT" --workers "$WORKERS"
