"""Sizes a legacy (pre-1.6, not zip) ``torch.save`` file claims, checked before torch reads it.

Such a file is four pickles (magic number, protocol, system info, the object) followed by each storage's bytes.
torch's loader allocates every storage at the element count its pickle's persistent id states and only then
compares the bytes the file holds, and its storages are resizable, so a tensor whose size, stride or offset
reaches past its storage grows the storage to fit: a count or a size made to lie (12 -> 10^12 float values) asked
the allocator for 4 TB ("DefaultCPUAllocator: can't allocate memory"), a size of 2^31 - 1 for 8 GB or more, before the
file was found corrupt. :func:`legacy_storage_problem` reads the pickles' opcodes without running them
(``pickletools``), following only the few values a tensor's rebuild takes (strings, integers, tuples, the
persistent ids), and refuses a storage larger than the whole file or a tensor reaching past its storage (what
torch itself refuses in a zip file, whose storages cannot grow). Used by :mod:`.torch_pickle`. Time O(pickle).
"""

from __future__ import annotations

import pickletools
from dataclasses import dataclass
from pathlib import Path

# bytes per element of the storage classes a persistent id names (torch.FloatStorage, ...); others count 1
_ELEMENT_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
                  "Byte": 1, "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8, "QInt32": 4}
_PUSHING = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BININT", "BININT1", "BININT2", "LONG1",
            "LONG4", "INT", "LONG", "GLOBAL", "NONE", "NEWTRUE", "NEWFALSE"}
_MARK_ENDS = {"SETITEMS", "APPENDS", "ADDITEMS", "DICT", "LIST", "FROZENSET", "OBJ", "INST", "POP_MARK"}
_REBUILDS = {"torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor"}


@dataclass(frozen=True)
class _Storage:
    kind: str  # FloatStorage, ...
    count: int  # elements


class _Lie(Exception):
    """What a pickle claims that the file cannot hold (its message)."""


def legacy_storage_problem(path: Path, size: int) -> str | None:
    """Why legacy file ``path`` of ``size`` bytes cannot hold what its object pickle claims (a storage over the
    file's size, a tensor reaching past its storage), else None; also None when the pickles cannot be read
    (torch's loader then says what is wrong)."""
    try:
        with open(path, "rb") as f:
            for _ in range(3):  # magic number, protocol version, system info
                for _ in pickletools.genops(f):
                    pass
            _follow(pickletools.genops(f), size)
    except _Lie as e:
        return f"header lies about sizes: {e}"
    except MemoryError:  # a string length of 2^62: pickletools asked for that many bytes
        return "corrupt PyTorch pickle: a length field claims more bytes than the file holds"
    except (ValueError, OSError, EOFError, KeyError, IndexError, TypeError):
        return None
    return None


def _follow(ops, size: int) -> None:
    """Run pickle ``ops`` on a stack of MARK frames holding only what a tensor rebuild takes (anything else is
    None); raise :class:`_Lie` at the first storage or tensor the file cannot hold."""
    frames: list[list] = [[]]
    memo: dict = {}
    for op, arg, _ in ops:
        name, top = op.name, frames[-1]
        if name == "MARK":
            frames.append([])
        elif name in _PUSHING:
            top.append(arg.replace("\n", " ") if name == "GLOBAL" else arg)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else arg] = top[-1] if top else None
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            top.append(memo.get(arg))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
            n = "EMPTY_TUPLE TUPLE1 TUPLE2 TUPLE3".split().index(name)
            items = top[len(top) - n:] if n else []
            del top[len(top) - n:]
            top.append(tuple(items))
        elif name in _MARK_ENDS | {"TUPLE"} and len(frames) > 1:
            items = frames.pop()
            frames[-1].append(tuple(items) if name == "TUPLE" else None)
        elif name in ("BINPERSID", "REDUCE"):
            _call(name, top, size)
        else:  # any other op: its result is nothing a rebuild takes
            top.append(None)


def _call(name: str, top: list, size: int) -> None:
    """BINPERSID: a storage id ``("storage", class, key, location, count, ...)`` becomes a :class:`_Storage`;
    REDUCE of a tensor rebuild ``(storage, offset, size, stride, ...)`` is checked against its storage."""
    arg = top.pop() if top else None
    func = top.pop() if name == "REDUCE" and top else None
    out = None
    if name == "BINPERSID" and isinstance(arg, tuple) and len(arg) >= 5 and arg[0] == "storage":
        kind, count = str(arg[1]).rpartition(" ")[2], arg[4]
        if isinstance(count, int):
            nbytes = count * _ELEMENT_BYTES.get(kind.removesuffix("Storage"), 1)
            if nbytes > size:
                raise _Lie(f"a {kind} of {count} elements needs {nbytes} bytes, more than the whole file's {size}")
            out = _Storage(kind, count)
    elif func in _REBUILDS and isinstance(arg, tuple) and len(arg) >= 4 and isinstance(arg[0], _Storage):
        _check_view(arg[0], arg[1], arg[2], arg[3])
    top.append(out)


def _check_view(storage: _Storage, offset, shape, stride) -> None:
    """A tensor of ``shape`` and ``stride`` at element ``offset`` of ``storage`` lies inside it."""
    ints = isinstance(offset, int) and all(isinstance(v, int) for v in (*shape, *stride))
    if not ints or not isinstance(shape, tuple) or not isinstance(stride, tuple) or len(shape) != len(stride):
        return  # torch's rebuild refuses it itself
    if 0 in shape:
        return
    last = offset + sum((s - 1) * abs(st) for s, st in zip(shape, stride))
    if offset < 0 or last >= storage.count:
        raise _Lie(f"a tensor of shape {shape}, stride {stride} at offset {offset} reaches element {last} of a "
                   f"{storage.kind} of {storage.count}")
