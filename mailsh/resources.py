"""Objects that hold a resource until ``close()``: one ``with`` protocol for all of them.

A connection, a watch, a database or a listener subclasses :class:`Closing` and
defines ``close()``: ``with obj:`` then gives ``obj`` and closes it on the way out,
whatever happened inside. One that must do something on entry too (connect, start
listening) overrides ``__enter__`` and still returns ``self``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """``with obj:`` yields ``obj`` and calls ``obj.close()`` when the block is left."""

    def close(self) -> None:
        """Release what the object holds; subclasses define it."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
