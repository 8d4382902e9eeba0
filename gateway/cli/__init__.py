"""The ``psg-gateway`` command line.

Before any command loads torch, OpenMP threads are told to spin only briefly before they sleep while they
wait (``GOMP_SPINCOUNT=3000``, unless the environment sets it or ``OMP_WAIT_POLICY``): see
:mod:`gateway.cpu` for why. Before any thread starts, the process gets one malloc arena (unless the
environment sets ``MALLOC_ARENA_MAX``): see :mod:`inference.heap`.

``kill -USR2 PID`` makes any command (the daemon, a batch) print every thread's stack to stderr and
carry on: where a process that seems stuck is waiting. The stacks hold file names, lines and function
names, never values, so no identifier reaches the log.
"""

import faulthandler
import signal

from inference.heap import limit_arenas

from ..cpu import default_wait_policy

default_wait_policy()
limit_arenas()
if hasattr(signal, "SIGUSR2"):
    faulthandler.register(signal.SIGUSR2, all_threads=True, chain=False)
