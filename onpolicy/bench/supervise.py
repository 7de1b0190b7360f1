"""Run a command so that it and everything it starts die with the process that asked for it.

    python -m onpolicy.bench.supervise PARENT_PID -- COMMAND [ARGS...]

The bench starts this process as the leader of a new process group (start_new_session), with
the parent-death signal set to SIGUSR1 (`die_with_parent`, prctl PR_SET_PDEATHSIG, in the
bench's preexec_fn). It starts COMMAND (vLLM's API server) in its own group, with a parent-death
signal too, and waits. The API server's own children (vLLM's EngineCore, its workers) stay in
the group. When the bench dies, even by SIGKILL, the kernel sends this process SIGUSR1 and it
kills the whole group with SIGKILL: nothing of the server outlives the bench (a parent-death
signal alone reaches only a direct child; the engine core is a grandchild). SIGTERM and SIGINT
are passed on to COMMAND, so the bench can still stop the server gracefully.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child (e.g. a preexec_fn): have the kernel send `sig` when the parent dies (Linux; else nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):
        pass


def die_with_parent_usr1() -> None:
    die_with_parent(signal.SIGUSR1)


def _kill_group(*_):
    os.killpg(os.getpgrp(), signal.SIGKILL)  # this process included


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m onpolicy.bench.supervise PARENT_PID -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    parent, cmd = int(argv[0]), argv[2:]
    signal.signal(signal.SIGUSR1, _kill_group)
    die_with_parent(signal.SIGUSR1)  # again, in case the exec'd interpreter lost it
    if os.getppid() != parent:  # the parent died before the signal was armed
        _kill_group()
    child = subprocess.Popen(cmd, preexec_fn=die_with_parent)  # same process group as this one

    def forward(sig, _frame):
        if child.poll() is None:
            child.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
