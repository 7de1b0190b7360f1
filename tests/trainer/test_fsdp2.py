"""FSDP2 (two and four CPU ranks, gloo): the patched forward of a sharded model gives the unsharded
model's token logprobs bitwise, and its gradients (the merged q/k/v and gate/up linears
included, onpolicy/trainer/merged.py) equal the unsharded ones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.timeout(600)
@pytest.mark.parametrize("ranks", [2, 4])
def test_fsdp2_sharded_equals_unsharded(ranks, tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) needs torch >= 2.6")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           str(HERE / "fsdp2_check.py"), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(ranks)]
    assert [(row["rank"], row["world"]) for row in rows] == [(rank, ranks) for rank in range(ranks)]
    for row in rows:
        assert row["bitwise"], row
        assert not row["control_bitwise"], f"transformers' own forward matched the patched one: {row}"
        assert row["grad_diff"] < 1e-6, row
