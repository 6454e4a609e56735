"""Progress reporting without printing from library code.

Library functions that run long take ``progress: Progress | None``. A :class:`Progress` wraps an iterable
and may show it (the CLI passes :func:`modelatlas.cli.output.tqdm_progress`); the default,
:func:`silent`, returns the iterable unchanged. ``set_postfix`` lets loops report a current loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")


class ProgressBar(Protocol):
    def __iter__(self) -> Iterator: ...

    def set_postfix(self, **values: object) -> None: ...


class Progress(Protocol):
    def __call__(self, iterable: Iterable[T], *, total: int | None = None, desc: str = "") -> ProgressBar: ...


class _Silent:
    """An iterable wrapper that shows nothing."""

    def __init__(self, iterable: Iterable):
        self._iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self._iterable)

    def set_postfix(self, **values: object) -> None:
        pass


def silent(iterable: Iterable[T], *, total: int | None = None, desc: str = "") -> ProgressBar:
    """The default progress: no output."""
    return _Silent(iterable)


def resolve(progress: Progress | None) -> Progress:
    """``progress`` or :func:`silent` when None."""
    return progress if progress is not None else silent
