#!/usr/bin/env bash
# Build .whl/: the wheels the lent GPU machine lacks, for its Python (3.12, x86-64, no network).
#
#   bash scripts/gpu_wheels.sh            # here, with the package index reachable; writes .whl/
#   GPU_PYTHON=3.11 bash scripts/gpu_wheels.sh   # another Python on the GPU side
#
# That machine has torch 2.11 / torchvision 0.26 / accelerate 1.15, rich, pyyaml, numpy, psutil,
# einops, msgpack, ninja, py-cpuinfo, nvidia-ml-py, tqdm, matplotlib, scikit-image, scikit-learn
# (/work/.library/device/KINDS.md), but not: pycocotools, webdataset (+ braceexpand), pydantic (+ its
# core, annotated-types, typing-inspection), hjson, DeepSpeed, fashionpedia. Binary wheels are
# downloaded for the GPU machine's platform; DeepSpeed (sdist only) is built here as a pure-Python
# wheel with DS_BUILD_OPS=0 (its ops JIT-compile there if ever needed; ZeRO-2 with a torch optimizer
# needs none), fashionpedia likewise. Versions follow this machine's environment (the ones the tests
# ran with) where installed, else pyproject's pins. .whl/ is git-ignored and travels with the
# device tool's `carry: [".whl"]`; bench/gpu_suite.sh installs from it when imports fail.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}   # a python with pip and torch (DeepSpeed's setup.py imports torch): `make setup`'s
[ -x "$PY" ] || PY=python3   # in a worktree without .venv: PY=/path/to/.venv/bin/python bash scripts/gpu_wheels.sh
GPU_PYTHON=${GPU_PYTHON:-3.12}
DEST=${DEST:-.whl}
LIMIT_MB=${LIMIT_MB:-48}                # the carry limit is 64 MiB for the whole tree: leave room for it

version() {  # installed version of a distribution in $PY, else the fallback given
    "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print(sys.argv[2])" "$1" "$2"
}
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }  # this host's pip.conf noise
spec() { local v; v=$(version "$1" "${2:-}"); if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi; }

BINARY=(
    "$(spec pycocotools 2.0.11)" "$(spec webdataset 1.0.2)" "$(spec braceexpand)"
    "$(spec pydantic)" "$(spec pydantic_core)" "$(spec annotated-types)" "$(spec typing-inspection)"
    "$(spec typing_extensions)" "$(spec hjson)"
)
BUILT=("$(spec deepspeed 0.19.8)" "$(spec fashionpedia 1.1)")

rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
echo "downloading for cp${GPU_PYTHON/./} manylinux x86_64: ${BINARY[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST.tmp" "${BINARY[@]}" 2>&1 | quiet
echo "building pure-Python wheels (DS_BUILD_OPS=0): ${BUILT[*]}"
DS_BUILD_OPS=0 DS_BUILD_STRING="" "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST.tmp" "${BUILT[@]}" 2>&1 | quiet
for w in "$DEST.tmp"/*.whl; do    # built wheels must not be tied to this machine's Python or platform
    case "$(basename "$w")" in
        deepspeed-*|fashionpedia-*) [[ "$w" == *-py3-none-any.whl ]] || { echo "error: $w is not pure Python" >&2; exit 1; } ;;
    esac
done
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
size_mb=$(du -sm "$DEST" | cut -f1)
ls -1 "$DEST"
echo "$DEST: $(ls "$DEST" | wc -l) wheels, ${size_mb} MiB (limit ${LIMIT_MB} MiB)"
if [ "$size_mb" -gt "$LIMIT_MB" ]; then
    echo "error: $DEST is ${size_mb} MiB, over the ${LIMIT_MB} MiB left for it under the 64 MiB carry limit" >&2
    exit 1
fi
