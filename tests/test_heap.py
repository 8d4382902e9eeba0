"""inference.heap: one malloc arena for the command line's processes, and freed pages handed back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from inference.heap import ARENA_ENV, limit_arenas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

# Four threads allocate (below the mmap threshold) and keep their blocks; glibc's malloc_info then
# lists one <heap> per arena.
_ARENAS = r"""
import ctypes, json, os, sys, tempfile, threading
{setup}
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
kept, started = [], threading.Barrier(4)
def work():
    started.wait()  # all four alive at once, so glibc cannot hand one thread's arena to the next
    kept.extend(libc.malloc(4096) for _ in range(64))
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
fd, path = tempfile.mkstemp()
os.close(fd)
fp = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, fp)
libc.fclose(fp)
print(json.dumps(open(path).read().count("<heap nr=")))
os.unlink(path)
"""


def _arenas(setup: str, env: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", _ARENAS.format(setup=setup)], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_command_line_gives_its_process_one_arena():
    env = {k: v for k, v in os.environ.items() if k != ARENA_ENV}
    assert _arenas("", env) > 1  # glibc's default: an arena per thread that allocates
    assert _arenas("import gateway.cli", env) == 1


def test_the_environment_keeps_its_own_arena_limit():
    env = {**os.environ, ARENA_ENV: "8"}
    assert _arenas("import gateway.cli", env) > 1
    assert limit_arenas({ARENA_ENV: "8"}) is None


def test_freed_pages_go_back_to_the_system():
    code = r"""
import json
import numpy as np
from inference.heap import release_free_memory
def anon():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) // 1024
# 2,000 blocks of 100 KB (below the mmap threshold), every other one freed: holes the heap's top
# never reaches, so glibc keeps their pages until malloc_trim
blocks = [np.ones(100 * 1024, dtype=np.uint8) for _ in range(2000)]
del blocks[::2]
before = anon()
assert release_free_memory()
print(json.dumps([before, anon()]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert before - after > 60, (before, after)  # ~100 MB of holes
