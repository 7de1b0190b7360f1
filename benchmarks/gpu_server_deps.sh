#!/usr/bin/env bash
# For a GPU machine without network access that has vLLM 0.26 from a bundle of wheels: what vLLM's OpenAI
# server imports beyond vLLM itself
# (found by running `onpolicy bench determinism` there: uvicorn, then model_hosting_container_standards).
# Build here:   bash benchmarks/gpu_server_deps.sh            (writes .gpu/c, ~6 MB)
# Use there:    carry [".gpu/b", ".gpu/c"]; source .gpu/b/setup.sh; source .gpu/c/setup.sh
set -eu
mkdir -p .gpu/c && cd .gpu/c
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  uvicorn h11 uvloop httptools model-hosting-container-standards jmespath supervisor httpx httpcore anyio
cat > setup.sh <<'SH'
# Unpack the server's extra wheels into the bundle's site dir (run after .gpu/b/setup.sh).
d=$(dirname "${BASH_SOURCE[0]}")
for w in "$d"/*.whl; do python3 -m zipfile -e "$w" /tmp/gpu-site; done
echo "part c unpacked"
SH
ls
