"""The fuzzing budget and the per-example guard.

Every fuzz test is derandomized (the same examples on every run, so CI is reproducible)
and keeps no example database (nothing is written into the repository). The default
budget keeps all fuzz tests together well under 30 s on 2 cores; set
``MAILSH_FUZZ_EXAMPLES=N`` to run N examples per test instead, for a long fuzz::

    MAILSH_FUZZ_EXAMPLES=20000 .venv/bin/pytest -q -n 2 tests/fuzz

Hypothesis deadlines are off (a loaded machine is slow, not broken); instead each
example runs under :func:`guard`, which fails it only when it hangs for many seconds or
allocates far beyond any input's size.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

#: Seconds an example may take before it counts as a pathological hang (gpg included).
HANG_SECONDS = 20.0
#: Python heap an example may use at its peak (inputs are at most a few hundred KiB).
MAX_PEAK_BYTES = 64 << 20

# Hypothesis caches what it learns in .hypothesis/ of the working directory: keep it out
# of the repository (one directory per user, reused between runs).
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), f"mailsh-hypothesis-{os.getuid()}"))
settings.register_profile(
    "mailsh-fuzz",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

F = TypeVar("F", bound=Callable[..., object])


def budget(examples: int) -> Callable[[F], F]:
    """This test's settings: ``examples`` by default, ``MAILSH_FUZZ_EXAMPLES`` if set."""
    wanted = os.environ.get("MAILSH_FUZZ_EXAMPLES", "").strip()
    count = int(wanted) if wanted else examples
    return settings(settings.get_profile("mailsh-fuzz"), max_examples=count)


class ExampleHungError(BaseException):
    """Not an Exception: no ``except Exception`` in the code under test may swallow it."""


@contextmanager
def guard(*, memory: bool = False) -> Iterator[None]:
    """Fail the example if it runs for :data:`HANG_SECONDS` or, with ``memory``, if its
    Python allocations peak above :data:`MAX_PEAK_BYTES`.

    Uses ITIMER_REAL and restores whatever timer was set before (pytest-timeout's).
    """

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise ExampleHungError(f"example still running after {HANG_SECONDS} s")

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    if memory:
        tracemalloc.start()
    try:
        yield
        if memory:
            _, peak = tracemalloc.get_traced_memory()
            assert peak <= MAX_PEAK_BYTES, f"example allocated {peak} bytes at its peak"
    finally:
        if memory:
            tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            left = max(old_delay - (time.monotonic() - start), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, old_interval)
