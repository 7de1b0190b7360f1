"""List the third-party top-level packages that vLLM's OpenAI server code imports and this
Python cannot find (run on the GPU machine after the bundle's setup): what part c must carry.

    python3 benchmarks/gpu_import_scan.py
"""
import ast
import importlib.util
import pathlib
import sys

import vllm

root = pathlib.Path(vllm.__file__).parent
wanted = set()
for sub in ("entrypoints", "v1/engine", "v1/executor", "utils", "transformers_utils", "tokenizers"):
    for f in (root / sub).rglob("*.py"):
        try:
            tree = ast.parse(f.read_text())
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:  # module level only: what importing the file needs
            if isinstance(node, ast.Import):
                wanted |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                wanted.add(node.module.split(".")[0])
missing = sorted(m for m in wanted if m not in sys.stdlib_module_names and importlib.util.find_spec(m) is None)
print("MISSING", " ".join(missing) if missing else "none")
