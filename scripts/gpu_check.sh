#!/usr/bin/env bash
# One command for a GPU node (CUDA 13 driver, no network): install the offline faiss-gpu bundle,
# run the `gpu` tests, run the GPU benchmark (generated data, Parquet in -> Parquet out, k=10,
# target recall 0.95) and the same jobs on the node's CPUs for the ratio, then the larger job
# routed (--routed-join: its list groups one at a time on the device), and print one table, all
# within a time budget (9 minutes by default).
#
#   scripts/gpu_check.sh --bundle DIR                  # on a GPU node: DIR holds faiss-gpu-*.tar.xz (gpu_bundle.py build)
#   scripts/gpu_check.sh --devices cpu                 # anywhere: the harness itself, on small data
#
# Options: --devices gpu,cpu | cpu   --big ROWSxDIM (default 2000000x128; 200000x64 with --devices cpu)
#          --wide ROWSxDIM (default 200000x768; 20000x384 with --devices cpu)   --cpu-rows N (default 1000000)
#          --budget-s SECONDS (default 540)   --out DIR (default $OUT, the device tool's, else gpu-check-out)
# The defaults make a short first call that leaves device time for a second: the issue's full sizes
# (--big 10000000x128 --wide 1000000x768) go in that second call. Each device's numbers are written
# as soon as it finishes, so a timeout keeps what finished.
set -euo pipefail
cd "$(dirname "$0")/.."

devices="gpu,cpu" bundle="" big="" wide="" cpu_rows=1000000 budget=540 out="${OUT:-gpu-check-out}"
while [ $# -gt 0 ]; do
    case "$1" in
        --devices) devices="$2"; shift 2 ;;
        --bundle) bundle="$2"; shift 2 ;;
        --big) big="$2"; shift 2 ;;
        --wide) wide="$2"; shift 2 ;;
        --cpu-rows) cpu_rows="$2"; shift 2 ;;
        --budget-s) budget="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        *) echo "gpu_check.sh: unknown option $1 (see the header of this script)" >&2; exit 2 ;;
    esac
done
if [ "$devices" = "cpu" ]; then big="${big:-200000x64}"; wide="${wide:-20000x384}"; else
    big="${big:-2000000x128}"; wide="${wide:-200000x768}"; fi
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
mkdir -p "$out"
python=${PYTHON:-python3}

if [ -n "$bundle" ]; then
    echo "== install faiss-gpu from $bundle"
    archive=$(ls "$bundle"/faiss-gpu-*.tar.xz | head -1)
    $python scripts/gpu_bundle.py install "$archive" --target "$out/faiss" | tee "$out/install.log"
    export PYTHONPATH="$PWD/$out/faiss${PYTHONPATH:+:$PYTHONPATH}"
    for wheels in "$bundle" "$bundle/wheels"; do  # build --deps writes dask & co. to wheels/
        if ls "$wheels"/*.whl >/dev/null 2>&1; then
            $python -m pip install -q --no-index --find-links "$wheels" "$wheels"/*.whl
        fi
    done
fi

echo "== pytest -m gpu ($(left) s left)"
set +e
timeout "$(left)" $python -m pytest -q -m gpu -ra -p no:cacheprovider 2>&1 | tail -15 | tee "$out/pytest-gpu.log"
tests=${PIPESTATUS[0]}
set -e

bench() {  # bench NAME ROWSxDIM EXTRA...
    local name=$1 shape=$2; shift 2
    local t; t=$(left)
    if [ "$t" -le 30 ]; then echo "== $name $shape: skipped, the budget is spent"; return 0; fi
    echo "== $name $shape ($t s left)"
    timeout "$t" $python scripts/gpu_benchmark.py --generate "$shape" --devices "$devices" --target-recall 0.95 \
        --workdir "$out/$name" --json "$out/$name.json" "$@" | tail -25 || echo "   ($name stopped: exit $?)"
}
bench big "$big" --cpu-rows "$cpu_rows"
bench wide "$wide" --cpu-rows "$(( cpu_rows / 4 ))"
# last: the routed join (its list groups one at a time on the device) on the first device, the big data again
bench routed "$big" --devices "${devices%%,*}" --workdir "$out/big" --routed

echo "== summary ($(( $(date +%s) - start )) s)"
$python - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| data | device | rows | wall s | join rows/s | recall@10 | peak GPU GiB |")
print("|---|---|---|---|---|---|---|")
for name in ("big", "wide", "routed"):
    f = out / f"{name}.json"
    if not f.exists():
        print(f"| {name} | - | - | not run | - | - | - |")
        continue
    results = json.loads(f.read_text())
    for r in results:
        gpu = r.get("gpu_peak_gib")
        print(f"| {name} | {r['device']} | {r['rows']:,} | {r['wall_s']} | {r['join_rows_per_s']:,} | "
              f"{r['recall']} | {'-' if gpu in (None, '') else gpu} |")
    by = {r["device"]: r for r in results}
    if "gpu" in by and "cpu" in by:
        print(f"| {name} | GPU / CPU join rows/s | | | {by['gpu']['join_rows_per_s'] / by['cpu']['join_rows_per_s']:.1f}x"
              " | | |")
EOF
echo "pytest -m gpu exit: $tests"
exit "$tests"
