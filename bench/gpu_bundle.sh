#!/usr/bin/env bash
# Prepares, on this (networked) machine, what bench/gpu_suite.py installs on the device machine, which reaches no
# package registry: the Python packages dlmoe needs that the device image lacks, as x86-64 wheels for its Python,
# installed into one tree and packed as build/gpu_bundle/site.tar.xz (with packages.txt, their pins). The versions
# are .venv's, the ones the project is tested with. The device tool carries at most 64 MiB with the working tree,
# and Ray's wheel alone is 79 MB: its Java jars, web UI build, RLlib, Serve and LLM libraries (none used by
# dlmoe) are left out, and xz does the rest (about 35 MB in all).
#
#   bash bench/gpu_bundle.sh                        # for the device image's Python 3.12
#   bash bench/gpu_bundle.sh 3.11 /tmp/bundle-311   # another Python, another folder (a local check of the bundle)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python_version=${1:-3.12}
out=${2:-$root/build/gpu_bundle}
py=$root/.venv/bin/python
test -x "$py" || { echo "gpu_bundle.sh: $py is missing: run make .venv/.installed first" >&2; exit 1; }

# What the device image lacks of dlmoe's needs (its package list: .library/device/KINDS.md of the workplace, read
# 2026-11-17; torch, numpy, pyarrow, pandas, tokenizers, safetensors, xxhash, pyyaml, tqdm, psutil, ... are there).
# MLflow is not bundled: with its ~40 dependencies it would not fit, and the suite trains with tracking off.
packages=(ray omegaconf hjson pydantic pydantic-core annotated-types typing-inspection jsonschema
          jsonschema-specifications referencing rpds-py tensorboardX)
abi=cp${python_version/./}
platform_flags=(--python-version "$python_version" --implementation cp --abi "$abi" --only-binary=:all:
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

version_of() { "$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }

rm -rf "$out"
mkdir -p "$out/wheels"
pins=()
for name in "${packages[@]}"; do pins+=("$name==$(version_of "$name")"); done
"$py" -m pip download --quiet --disable-pip-version-check --no-deps "${platform_flags[@]}" -d "$out/wheels" "${pins[@]}"
# DeepSpeed is published as a source distribution only; its wheel is pure Python (ops compile on first use).
deepspeed_pin="deepspeed==$(version_of deepspeed)"
"$py" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w "$out/wheels" "$deepspeed_pin"
pins+=("$deepspeed_pin")

"$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-index --no-compile "${platform_flags[@]}" \
    --target "$out/site" "$out"/wheels/*.whl
rm -rf "$out/site/ray/jars" "$out/site/ray/dashboard/client/build" "$out/site/ray/rllib" "$out/site/ray/serve" \
       "$out/site/ray/llm" "$out/site/bin"
find "$out/site" -name __pycache__ -type d -prune -exec rm -rf {} +
printf '%s\n' "${pins[@]}" >"$out/packages.txt"
tar -C "$out/site" -cf - . | xz -6 -T0 >"$out/site.tar.xz"
rm -rf "$out/site" "$out/wheels"

size=$(stat -c %s "$out/site.tar.xz")
echo "gpu_bundle.sh: $out/site.tar.xz, $((size / 1048576)) MiB, Python $python_version: ${pins[*]}"
if [ "$size" -gt $((56 * 1048576)) ]; then
    echo "gpu_bundle.sh: the bundle is over 56 MiB: with the working tree it may not fit the device tool's 64 MiB" >&2
    exit 1
fi
