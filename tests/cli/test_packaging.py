"""What `pip install` gives: the base install (CLI + dashboard) needs no torch; the data ships."""
import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_base_install_pulls_no_torch():
    base = " ".join(_project()["dependencies"]).lower()
    assert "torch" not in base and "transformers" not in base and "vllm" not in base, base
    extras = _project()["optional-dependencies"]
    for name in ("torch", "vllm", "cpu", "trl"):  # every extra that runs a kernel brings torch
        assert any(d.startswith("torch") for d in extras[name]), name


def test_the_dashboard_runs_where_torch_cannot_be_imported(tmp_path):
    """`onpolicy dashboard --help` and reading a run, with torch made unimportable."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "bitwise_equal_frac": 1.0, "tokens": 4}\n')
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now fails
from typer.testing import CliRunner
from onpolicy.cli import _register, app
_register()
r = CliRunner().invoke(app, ["dashboard", "--help"])
assert r.exit_code == 0, r.output
r = CliRunner().invoke(app, ["check", "--model", "m"])  # a command that needs torch says so
assert r.exit_code == 2 and "onpolicy[vllm]" in r.output, r.output
from onpolicy.dashboard import data
runs = data.resolve_runs([{str(run)!r}])
assert len(runs) == 1, runs
print("loaded", type(data).__name__)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "loaded" in r.stdout


def test_check_is_registered_where_the_dashboard_cannot_be_imported():
    """A checkout run without installing (the GPU machine's bundle) may lack the dashboard's CRC package:
    `onpolicy check` still registers, and `onpolicy dashboard` says what is missing (exit 2)."""
    code = """
import sys
sys.modules["google_crc32c"] = None  # the dashboard's TensorBoard reader cannot import
from typer.testing import CliRunner
from onpolicy.cli import _register, app
_register()
r = CliRunner().invoke(app, ["check", "--help"])
assert r.exit_code == 0 and "--model" in r.output, r.output
r = CliRunner().invoke(app, ["dashboard", "runs"])
assert r.exit_code == 2 and "dashboard's dependencies" in r.output, r.output
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
