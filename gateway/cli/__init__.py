"""The ``psg-gateway`` command line.

Before any command loads torch, OpenMP threads are told to sleep while they wait
(``OMP_WAIT_POLICY=PASSIVE``, unless the environment sets it): see :mod:`gateway.cpu` for why.
"""

from ..cpu import default_wait_policy

default_wait_policy()
