"""``kill -USR2`` makes any psg-gateway command print every thread's stack and carry on (gateway.cli)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_sigusr2_prints_every_threads_stack_and_the_command_carries_on():
    code = ("import os, signal, threading, time; import gateway.cli.main\n"
            "t = threading.Thread(target=time.sleep, args=(5,), daemon=True); t.start()\n"
            "os.kill(os.getpid(), signal.SIGUSR2); time.sleep(0.3); print('still running')\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "still running"
    assert "Current thread 0x" in out.stderr and out.stderr.count("Thread 0x") == 1  # both threads
    assert 'File "<string>", line 3' in out.stderr
