"""Start vLLM's OpenAI-compatible server as users run it, wait for it, and always take it down.

The server runs under `onpolicy.bench.supervise` in its own process group (its engine core and
workers join it), so `stop()` ends all of it, and so does the bench's death, even by SIGKILL
(the supervisor gets a parent-death signal and kills the group); `VllmServer` is a context
manager that stops it on any exit.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Config:
    name: str
    env: dict
    label: str


# Environment each configuration sets on the server (after dropping DROPPED_ENV).
CONFIGS = {
    "onpolicy": Config("onpolicy", {"ONPOLICY_VLLM": "1"}, "onpolicy plugin on (ONPOLICY_VLLM=1)"),
    "default": Config("default", {"ONPOLICY_VLLM": "0"}, "vLLM default"),
    "batch_invariant": Config("batch_invariant", {"ONPOLICY_VLLM": "0", "VLLM_BATCH_INVARIANT": "1"},
                              "vLLM VLLM_BATCH_INVARIANT=1"),
}
# Never inherited by the server: the in-process engine switch the test suite sets (users run the
# multiprocess engine), and the switches the configurations own.
DROPPED_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_BATCH_INVARIANT", "ONPOLICY_VLLM")
# Logged (at INFO) by onpolicy.vllm_plugin.register() in each vLLM process where the plugin is on.
PLUGIN_LOG_LINE = "onpolicy vLLM plugin registered"


_EXC = re.compile(r"(?:^|\] )([A-Za-z_][\w.]*(?:Error|Exception): .*)$")
_WRAPPERS = ("Engine core initialization failed", "Worker failed with error", " WARNING ")


class ServerError(Exception):
    """The server did not come up, or died."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_env(config: Config, base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    for k in DROPPED_ENV:
        env.pop(k, None)
    env.update(config.env)
    return env


def server_command(python: str, model: str, port: int, *, max_model_len: int, max_num_seqs: int,
                   max_num_batched_tokens: int, seed: int, gpu_memory_utilization: Optional[float],
                   extra: tuple = ()) -> list[str]:
    """The command line; only flags that vLLM 0.26 and 0.32 both accept."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", HOST,
           "--port", str(port), "--dtype", "bfloat16", "--seed", str(seed), "--max-model-len", str(max_model_len),
           "--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", str(max_num_batched_tokens)]
    if gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    return cmd + list(extra)


def supervised(cmd: list[str]) -> list[str]:
    """`cmd` run under onpolicy.bench.supervise for this process (see that module)."""
    return [sys.executable, "-m", "onpolicy.bench.supervise", str(os.getpid()), "--", *cmd]


class VllmServer:
    def __init__(self, cmd: list[str], env: dict, log_path: Path):
        self.cmd, self.env, self.log_path = cmd, env, Path(log_path)
        self.port = int(cmd[cmd.index("--port") + 1])
        self.url = f"http://{HOST}:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self) -> None:
        from .supervise import die_with_parent_usr1

        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(supervised(self.cmd), env=self.env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=die_with_parent_usr1 if sys.platform.startswith("linux") else None)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def root_cause(self) -> str:
        """The first exception line in the log (vLLM logs a worker's error long before its last lines)."""
        for line in self.log_text().splitlines():
            m = _EXC.search(line)
            if m and not any(w in line for w in _WRAPPERS):
                return m.group(1).strip()[:300]
        return ""

    def _failure(self, what: str) -> str:
        cause = self.root_cause()
        return (f"{what}{': ' + cause if cause else ''} (log: {self.log_path})\n"
                f"last lines of the log:\n{self.log_tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 5.0) -> bool:
        import httpx

        try:
            return httpx.get(self.url + "/health", timeout=timeout, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout: float) -> float:
        """Seconds until /health answered 200; ServerError (with the log's tail) if it dies or times out."""
        t0 = time.monotonic()
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(self._failure(f"the vLLM server exited with code {rc} before it was ready"))
            if self.healthy(timeout=2.0):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise ServerError(self._failure(f"the vLLM server was not healthy within {timeout:.0f} s"))
            time.sleep(0.5)

    def served_model(self) -> str:
        import httpx

        try:
            r = httpx.get(self.url + "/v1/models", timeout=30, trust_env=False)
            r.raise_for_status()
            return r.json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            raise ServerError(self._failure(f"GET /v1/models failed ({type(e).__name__}: {e})")) from None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the API server (through its supervisor; it shuts its engine down), then SIGKILL to
        whatever of its process group is left after `grace` seconds; idempotent."""
        p = self.proc
        if p is not None:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                    p.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
            self._signal(signal.SIGKILL)  # the whole group: engine core and workers included
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
