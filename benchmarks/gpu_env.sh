# Source on the GPU machine after the vLLM bundle's setup.sh: the repo importable without installing it.
#   source benchmarks/gpu_env.sh
# onpolicy_kernels (kernels/) and onpolicy from the working tree, and a dist-info folder that
# declares onpolicy's vLLM entry points (general + platform plugin), so every vLLM process -- server,
# engine core, TP workers -- loads the plugin when ONPOLICY_VLLM=1, as with `pip install`.
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_ALLREDUCE_USE_SYMM_MEM=0  # keeps NVLink multicast off (see the device notes)
mkdir -p /tmp/shim/onpolicy-0.1.0.dist-info
printf 'Metadata-Version: 2.1\nName: onpolicy\nVersion: 0.1.0\n' > /tmp/shim/onpolicy-0.1.0.dist-info/METADATA
python3 - <<'PY' > /tmp/shim/onpolicy-0.1.0.dist-info/entry_points.txt
import tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]
for group, items in eps.items():
    print(f"[{group}]")
    for k, v in items.items():
        print(f"{k} = {v}")
    print()
PY
export PYTHONPATH="/tmp/shim:$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}"
