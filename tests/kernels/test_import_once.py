"""The ops are defined once per process, however often the package's modules run.

The folder kernels/ is the package `onpolicy_kernels`, but wherever the checkout's
root is on sys.path (`python -m pytest`, `python -m onpolicy.cli`, `python -c`, all run
there) it is also importable as a top-level `kernels` -- and transformers imports
`kernels` when it probes for Hugging Face's package of that name (every
`import transformers.activations`). Defining an op again made torch destroy the first
definition: its dispatcher entry was freed while torch.ops.onpolicy.* and the functions
of onpolicy_kernels still pointed at it, so later calls read freed memory -- the
intermittent segfaults, std::bad_alloc and "schema for '' not registered" of the CPU
suite. These run in fresh processes, from the checkout's root, the way the suite does.
"""
from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

PRELUDE = """
import importlib, sys, torch
from torch._library.custom_ops import OPDEFS, OPDEF_TO_LIB

def snapshot():
    names = sorted(n for n in OPDEFS if n.startswith("onpolicy::"))
    assert len(names) == 11, names
    return {n: (OPDEFS[n], OPDEF_TO_LIB[n], getattr(torch.ops.onpolicy, n.split("::")[1]).default) for n in names}

def assert_same(before, after):
    for n in before:
        assert all(a is b for a, b in zip(before[n], after[n])), f"{n} was defined again"
    for n, (opdef, _, _) in after.items():
        assert opdef._init_fn.__module__.startswith("onpolicy_kernels."), (n, opdef._init_fn.__module__)

x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
"""


def _run(body: str):
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", PRELUDE + body], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok"), r.stdout[-2000:]


def test_top_level_kernels_import_after_the_package_reuses_its_ops():
    _run("""
import onpolicy_kernels as K
ref = K.linear(x, w, b)
before = snapshot()
alias = importlib.import_module("kernels")  # what transformers' probe does, from the checkout's root
assert alias.__name__ == "kernels" and "kernels.linear" in sys.modules
assert_same(before, snapshot())
assert torch.equal(K.linear(x, w, b), ref) and torch.equal(alias.linear(x, w, b), ref)
first = sys.modules["onpolicy_kernels.linear"]._linear_op.body
assert sys.modules["kernels.linear"]._linear_op.body is first  # eager direct calls: one implementation
importlib.reload(sys.modules["onpolicy_kernels.linear"])
assert_same(before, snapshot())
assert torch.equal(K.linear(x, w, b), ref)
assert sys.modules["onpolicy_kernels.linear"]._linear_op.body is first
print("ok")
""")


def test_top_level_kernels_import_first_defines_the_ops_in_the_package():
    _run("""
alias = importlib.import_module("kernels")
before = snapshot()  # already defined by onpolicy_kernels (imported by the alias first)
import onpolicy_kernels as K
assert_same(before, snapshot())
assert torch.equal(K.linear(x, w, b), alias.linear(x, w, b))
print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_transformers_probe_leaves_the_ops_alone():
    _run("""
import onpolicy_kernels as K
ref = K.rms_norm(x, torch.ones(8), 1e-6)
before = snapshot()
import transformers.activations  # probes `kernels` (transformers.integrations.hub_kernels)
assert_same(before, snapshot())
assert torch.equal(K.rms_norm(x, torch.ones(8), 1e-6), ref)
print("ok")
""")
