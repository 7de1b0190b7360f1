"""Every ONPOLICY_* environment variable is read in one module (onpolicy_kernels/envs.py), documented there."""
import pathlib
import re

import pytest

from onpolicy_kernels import envs

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_no_other_module_reads_an_onpolicy_variable():
    """Reads of the environment elsewhere are of other programs' variables (or save and restore one)."""
    allowed = {"onpolicy/trl_grpo.py": "old = os.environ.get(name)",  # _env: set a variable for a block
               # the plugin's entry point runs in every vLLM process: it must not import the kernels
               "onpolicy/vllm_plugin/__init__.py": "os.environ.get(ENV_VAR, \"0\")",
               "onpolicy/dashboard/trackio_store.py": "os.environ.get("}  # TRACKIO_DIR, HF_HOME, XDG_CACHE_HOME
    found = []
    for folder in ("kernels", "onpolicy"):
        for p in (ROOT / folder).rglob("*.py"):
            rel = str(p.relative_to(ROOT))
            if p.name == "envs.py":
                continue
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if re.search(r"environ\.get\(|getenv\(", line) and allowed.get(rel, "\0") not in line:
                    found.append(f"{rel}:{i}: {line.strip()}")
                if re.search(r"environ\.get\(\s*[\"']ONPOLICY_", line):  # a literal name: read it in envs
                    found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, found


def test_the_table_documents_every_variable():
    documented = re.findall(r"^\| (ONPOLICY_\w+) \|", envs.__doc__, re.M)
    assert documented == list(envs.NAMES)


@pytest.mark.parametrize("name,bad", [("ONPOLICY_KERNELS_BACKEND", "gpu"), ("ONPOLICY_ATTENTION", "flash"),
                                      ("ONPOLICY_DECODE_GRAPHS", "maybe"), ("ONPOLICY_DECODE_GRAPH_ROWS", "999")])
def test_a_bad_value_names_the_variable(monkeypatch, name, bad):
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValueError, match=name):
        getattr(envs, name)


def test_defaults_and_values(monkeypatch, tmp_path):
    for n in envs.NAMES:
        monkeypatch.delenv(n, raising=False)
    assert (envs.ONPOLICY_VLLM, envs.ONPOLICY_KERNELS_BACKEND, envs.ONPOLICY_ATTENTION) == (False, "auto", "auto")
    assert envs.ONPOLICY_LINEAR_CUBLASLT is None and envs.ONPOLICY_DECODE_GRAPHS is True
    assert envs.ONPOLICY_DECODE_GRAPH_ROWS == envs.DECODE_GRAPH_MAX_ROWS
    monkeypatch.setenv("ONPOLICY_LINEAR_CUBLASLT", "0")
    monkeypatch.setenv("ONPOLICY_LINEAR_CACHE", "off")
    monkeypatch.setenv("ONPOLICY_VLLM", "1")
    assert envs.ONPOLICY_LINEAR_CUBLASLT is False and envs.ONPOLICY_LINEAR_CACHE is None and envs.ONPOLICY_VLLM
    monkeypatch.setenv("ONPOLICY_LINEAR_CACHE", str(tmp_path))
    assert envs.ONPOLICY_LINEAR_CACHE == str(tmp_path)
    with pytest.raises(AttributeError):
        envs.ONPOLICY_NOPE
