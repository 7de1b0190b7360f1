"""The ops are defined once per process, and only by the package `onpolicy_kernels`.

The kernels live in kernels/onpolicy_kernels/: the folder is the import name, so no second
name reaches them -- in particular not a top-level `kernels` (transformers imports
`kernels` when it probes for Hugging Face's package of that name, and from the checkout's
root that used to be this folder, which defined every op a second time: torch then freed
the first definition's dispatcher entry while everything bound to it still pointed there).
Defining an op again on a module reload (a notebook's autoreload) must not do that either.
These run in fresh processes, from the checkout's root, the way the suite does.
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
    assert len(names) == 17, names  # 11 + the MoE ops (moe_route, moe_combine, moe_routed, moe_expert_outputs) + the truncation mask + rank_sum
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


def test_a_top_level_kernels_import_does_not_reach_onpolicy_code():
    _run("""
import onpolicy_kernels as K
before = snapshot()
try:
    alias = importlib.import_module("kernels")  # what transformers' probe does, from the checkout's root
except ImportError:
    alias = None
assert alias is None or not hasattr(alias, "linear"), alias
assert not [m for m in sys.modules if m.startswith("kernels.")], [m for m in sys.modules if m.startswith("kernels.")]
assert_same(before, snapshot())
print("ok")
""")


def test_a_reload_reuses_the_ops():
    _run("""
import onpolicy_kernels as K
ref = K.linear(x, w, b)
before = snapshot()
first = sys.modules["onpolicy_kernels.ops.linear"]._linear_op.body
importlib.reload(sys.modules["onpolicy_kernels.ops.linear"])
assert_same(before, snapshot())
assert torch.equal(K.linear(x, w, b), ref)
assert sys.modules["onpolicy_kernels.ops.linear"]._linear_op.body is first  # one implementation
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
