"""Plugin loading through vLLM's entry points, in fresh processes.

* disabled (no ONPOLICY_VLLM): loading vLLM's plugins changes nothing;
* enabled: the platform entry point makes the platform onpolicy's before any
  engine exists, and the general entry point registers the layers, the linear
  config and the CUSTOM attention backend.

If the installed package does not (yet) declare the `vllm.platform_plugins`
entry point, the test supplies it through a throw-away distribution on
PYTHONPATH (same name, same target) so the mechanism itself is tested.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

PROBE = r"""
import json, os
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
import vllm.platforms as vp
platform_first = type(vp.current_platform).__name__
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.model_executor.custom_op import op_registry_oot
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from vllm.v1.attention.backends.registry import AttentionBackendEnum
custom = AttentionBackendEnum.CUSTOM.get_path() if AttentionBackendEnum.CUSTOM.is_overridden() else None
print("PROBE" + json.dumps({"platform_first": platform_first, "platform": type(vp.current_platform).__name__,
                  "oot": sorted(op_registry_oot), "onpolicy_quant": "onpolicy" in QUANTIZATION_METHODS,
                  "custom": custom}))
"""


def _platform_entry_point_installed() -> bool:
    return any(ep.value == "onpolicy.vllm_plugin.platform:detect" for ep in entry_points(group="vllm.platform_plugins"))


def _shim(tmp: Path) -> Path:
    d = tmp / "shim" / "onpolicy_platform_shim-0.0.0.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: onpolicy-platform-shim\nVersion: 0.0.0\n")
    (d / "entry_points.txt").write_text("[vllm.platform_plugins]\nonpolicy = onpolicy.vllm_plugin.platform:detect\n")
    return d.parent


def _probe(env_extra: dict, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ONPOLICY_VLLM", "VLLM_PLUGINS", "VLLM_TARGET_DEVICE")}
    env.update(env_extra)
    if not _platform_entry_point_installed():
        env["PYTHONPATH"] = os.pathsep.join([str(_shim(tmp_path)), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(line[0][len("PROBE"):])


def test_disabled_plugin_changes_nothing(tmp_path):
    got = _probe({}, tmp_path)
    assert got["platform"] == "CpuPlatform"
    assert not {"RMSNorm", "SiluAndMul", "RotaryEmbedding", "LogitsProcessor"} & set(got["oot"])
    assert not got["onpolicy_quant"]
    assert got["custom"] is None


def test_enabled_plugin_through_entry_points(tmp_path):
    got = _probe({"ONPOLICY_VLLM": "1"}, tmp_path)
    assert got["platform_first"] == "OnpolicyCpuPlatform"  # platform entry point, before general plugins
    assert {"RMSNorm", "SiluAndMul", "RotaryEmbedding", "Llama3RotaryEmbedding", "LogitsProcessor"} <= set(got["oot"])
    assert got["onpolicy_quant"]
    assert got["custom"] == "onpolicy.vllm_plugin.attention.OnpolicyAttentionBackend"
