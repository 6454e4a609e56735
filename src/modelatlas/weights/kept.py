"""What a reader read for one tensor, kept after :meth:`~modelatlas.weights.Checkpoint.read` for the one call on
that tensor that follows.

Lineage's pass reads a quantized layer, then asks for its rounding variance (and a copy test for its grid),
and each of those read the layer's stored data again: a GGUF tensor's raw bytes, a packed layer's codes and
scales (~2x the bytes of a pass; session 32). A reader keeps what its :meth:`read` read in a :class:`Kept`, and
the next method on that tensor takes it; the next read replaces it and ``close()`` drops it, so at most one
tensor's stored data is held, usually for the moment between the read and the call. Time O(1).
"""

from __future__ import annotations

from typing import Any


class Kept:
    """One tensor's stored data (any object) kept under its name for one taker."""

    def __init__(self) -> None:
        self._item: tuple[str, Any] | None = None

    def keep(self, name: str, data: Any) -> None:
        """Keep ``data`` for tensor ``name``, in place of what was kept."""
        self._item = (name, data)

    def has(self, name: str) -> bool:
        """Whether tensor ``name``'s data is kept."""
        return self._item is not None and self._item[0] == name

    def take(self, name: str) -> Any | None:
        """Tensor ``name``'s kept data, no longer kept (one taker each); None when another tensor's or nothing is.
        The slot is read once: two threads on one checkpoint (one reading another tensor meanwhile) never get
        another tensor's data for ``name``, at worst None (read again)."""
        item = self._item
        if item is None or item[0] != name:
            return None
        self._item = None
        return item[1]

    def drop(self) -> None:
        """Keep nothing (the next read, ``close()``)."""
        self._item = None
