"""``OneCallAtATime``: a model object that keeps static buffers serves one generation at a time.

The planner and the executor keep their K/V caches, token buffers and CUDA graphs between calls;
two threads generating with the same object would overwrite each other's buffers and return wrong
tokens without an error. The guard turns that into a ``RuntimeError`` on the second caller.
"""

from __future__ import annotations

import contextlib
import functools
import threading


class OneCallAtATime:
    """``with guard():`` around a generation; a second one while the first runs raises."""

    def __init__(self, owner: str):
        self.owner = owner
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self):
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                f"{self.owner} is already generating (in another thread, or a generate_stream that is "
                f"still being iterated): it keeps one set of static buffers, so use one {self.owner} "
                "per thread"
            )
        try:
            yield
        finally:
            self._lock.release()


def one_at_a_time(method):
    """Decorate a generate method of an object with a ``_busy`` :class:`OneCallAtATime`."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with self._busy():
            return method(self, *args, **kwargs)

    return guarded
