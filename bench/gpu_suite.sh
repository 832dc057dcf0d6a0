#!/usr/bin/env bash
# The GPU suite of issue 14 (bench/gpu_suite.py says what it runs; docs/gpu.md how to run it on the
# lent GPU machine). One command, ~8 minutes on one GPU; --smoke: the same code on the CPU in ~1 min.
#
#   bash bench/gpu_suite.sh [--smoke] [--out DIR] [--parts gpu_tests,train,data_wait,deepspeed,inference]
#
# Runs from the repository root with PYTHONPATH=. (no install). Packages the machine lacks
# (pycocotools, webdataset, pydantic, DeepSpeed, ...) come from the wheel folder .whl/ that
# scripts/gpu_wheels.sh builds: installed with pip --no-index into a folder on PYTHONPATH, once.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the smoke run shares a small CPU; on the GPU machine every process keeps torch's own thread count
case " $* " in *" --smoke "*) export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;; esac
NEEDED="pycocotools webdataset pydantic yaml rich"
OPTIONAL="deepspeed hjson fashionpedia"
missing() {  # the modules of "$@" this python cannot find (find_spec: nothing is imported)
    "$PY" -c 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' "$@"
}
miss=$(missing $NEEDED $OPTIONAL)
if [ -n "$miss" ]; then
    SITE=${SITE:-/tmp/fashionseg_site}
    if ls .whl/*.whl >/dev/null 2>&1; then
        echo "installing from .whl/ into $SITE (missing: $(echo $miss))"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            || echo "warning: pip install from .whl/ failed; the parts that need those packages will say so"
        export PYTHONPATH="$PYTHONPATH:$SITE"
    else
        echo "warning: missing $(echo $miss) and no .whl/ folder (build it with scripts/gpu_wheels.sh, carry it as .whl)"
    fi
    still=$(missing $NEEDED)
    [ -z "$still" ] || echo "warning: still missing: $(echo $still)"
fi
exec "$PY" bench/gpu_suite.py "$@"
