"""Seeded damage for the dataset loaders' fuzz tests (tests/data/test_fuzz_loaders.py).

Each ``make_*_data(folder)`` writes one tiny valid dataset with the writers of the loaders' own tests and
returns a :class:`Made`: how to load it, the files a case may damage (file -> damage kind), and what a loaded
dataset must look like. ``make_damage(rng, file, kind)`` damages one file in place (a seeded random choice among
generic byte damage, tests/weights/fuzz_damage.py's, and damage that follows the format) and returns what it did.
``check_loads(made, damaged)`` loads the dataset and accepts only a dataset of the expected form or a one-line
AtlasError naming the damaged file, within a time and a memory limit.
"""

from __future__ import annotations

import gzip
import io
import pickle
import pickletools
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tests.data.test_cifar import make_cifar10
from tests.data.test_idx import make_fashion_folder
from tests.weights.fuzz_damage import HUGE_INTS, check_limits, make_byte_damage, make_pickle_lie

from modelatlas.data import load_dataset
from modelatlas.errors import AtlasError

RAN: list = []  # what make_ran was called with: a CIFAR batch's global must never reach it


def make_ran(*args):
    """The global a damaged batch names in place of NumPy's (it would run if the batch were unpickled normally)."""
    RAN.append(args)
    return args


@dataclass
class Made:
    """A valid dataset on disk: ``load()`` reads it; ``files`` the damageable files and their kinds; a loaded
    dataset has ``channels`` channels, ``size`` (H, W) (None: any), ``classes`` classes and at most ``most``
    examples."""

    load: object
    files: dict
    channels: int
    size: tuple | None
    classes: int
    most: int


# ---------------------------------------------------------------- valid datasets


def make_idx_data(folder: Path, gz: bool = False) -> Made:
    """Fashion-MNIST's four IDX files (6 images of 28 x 28 per split); the training pair is damaged."""
    make_fashion_folder(folder, gz=gz)
    suffix = ".gz" if gz else ""
    files = {folder / f"train-{k}-idx{d}-ubyte{suffix}": "idx-gz" if gz else "idx" for k, d in (("images", 3), ("labels", 1))}
    return Made(lambda: load_dataset("fashion-mnist", "train", root=folder), files, 1, None, 10, 2**32)


def make_cifar10_data(folder: Path) -> Made:
    """The five training batches of 4 images, test_batch and batches.meta (protocol 4)."""
    make_cifar10(folder)
    batches = folder / "cifar-10-batches-py"
    files = {batches / f"data_batch_{i}": "pickle" for i in range(1, 6)}
    return Made(lambda: load_dataset("cifar10", "train", root=folder), {**files, batches / "batches.meta": "pickle"},
                3, (32, 32), 10, 2**32)


def make_cifar100_data(folder: Path) -> Made:
    """train and test of 3 images (str keys, as tests/data/test_cifar.py writes them) and meta."""
    batches = folder / "cifar-100-python"
    batches.mkdir()
    data = np.random.default_rng(0).integers(0, 256, (3, 3072)).astype(np.uint8)
    for split in ("train", "test"):
        (batches / split).write_bytes(pickle.dumps({"data": data, "fine_labels": [0, 50, 99]}, protocol=4))
    (batches / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}, protocol=4))
    return Made(lambda: load_dataset("cifar100", "train", root=folder),
                {batches / "train": "pickle", batches / "meta": "pickle"}, 3, (32, 32), 100, 2**32)


def make_image_data(folder: Path, channels: int = 3) -> Made:
    """Two classes of one image per format the folder reads (8-bit gray, RGB and palette PNG, 16-bit PNG, JPEG,
    PGM, BMP), all loaded as the train split (test_fraction 0) at 8 x 8."""
    from PIL import Image

    rng, files = np.random.default_rng(0), {}
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        images = {"g.png": Image.fromarray(rgb[..., 0]), "rgb.png": Image.fromarray(rgb),
                  "p.png": Image.fromarray(rgb).convert("P"), "w.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
                  "j.jpg": Image.fromarray(rgb), "m.pgm": Image.fromarray(rgb[..., 1]), "b.bmp": Image.fromarray(rgb)}
        for name, im in images.items():
            im.save(folder / c / name)
            files[folder / c / name] = {".jpg": "jpeg", ".pgm": "pgm", ".bmp": "bmp"}.get(Path(name).suffix, "png")
    return Made(lambda: load_dataset("image-folder", "train", root=folder, size=8, channels=channels,
                                     test_fraction=0.0), files, channels, (8, 8), 2, len(files))


# ---------------------------------------------------------------- damage


def make_damage(rng: random.Random, path: Path, kind: str) -> str:
    """Damage ``path`` (a file of ``kind``: idx, idx-gz, pickle, png, jpeg, pgm, bmp) in place; returns what was
    done. About a third of the damage is generic (tests/weights/fuzz_damage.py), the rest follows the format; an
    image may also become another format's (:func:`make_foreign_image`)."""
    data = path.read_bytes()
    if kind in ("png", "jpeg", "pgm", "bmp") and rng.random() < 0.1:
        return make_foreign_image(rng, path)
    if rng.random() < 0.35:
        return make_byte_damage(rng, path, data, _HEAD_END.get(kind, lambda d: len(d) // 2)(data))
    return _SPECIAL[kind](rng, path, data)


def make_foreign_image(rng: random.Random, path: Path) -> str:
    """``path`` (named .png, .jpg, ...) holding another format's image: what Pillow reads (GIF, TIFF, WebP, ICO,
    TGA, ...), or EPS, which it renders by running Ghostscript (never done: :func:`check_loads` records a call)."""
    from PIL import Image

    fmt = rng.choice(["GIF", "TIFF", "WEBP", "ICO", "TGA", "PCX", "EPS", "EPS", "PNG", "JPEG", "PPM", "BMP", "SGI"])
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(rng.randrange(99)).integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(buf, fmt)
    path.write_bytes(buf.getvalue())
    return f"{path.name}: holds a {fmt} image"


_HEAD_END = {"idx": lambda d: 4 + 4 * d[3], "idx-gz": lambda d: 10, "pickle": lambda d: min(len(d), 64),
             "png": lambda d: 33, "bmp": lambda d: 54, "pgm": lambda d: 12, "jpeg": lambda d: len(d) // 3}


def make_idx_lie(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    """An IDX file's header made to lie: magic, type code, number of dimensions, a size, or all sizes replaced
    by another factoring of as many values (a consistent lie)."""
    out, ndim = bytearray(raw), raw[3]
    dims = list(struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim]))
    op = rng.choice(["magic", "code", "code", "ndim", "dim", "dim", "reshape", "reshape"])
    if op == "magic":
        out[rng.randrange(2)] = value = rng.choice([1, 8, 0x1F, 255])
    elif op == "code":
        out[2] = value = rng.choice([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0x0A, 0x42, 0xFF])
    elif op == "ndim":
        out[3] = value = rng.choice([0, 1, 2, 3, 4, 5, 255])
    elif op == "dim":
        at = rng.randrange(ndim)
        dims[at] = value = rng.choice([0, 1, 2**32 - 1, 2**31, 65536, dims[at] + 1, dims[at] - 1, 2 * dims[at]])
        out[4 + 4 * at:8 + 4 * at] = struct.pack(">I", value)
    else:
        n = int(np.prod(dims))
        value = rng.choice([(n,), (1, n), (n, 1), (2, n // 2), (n // 2, 2), (dims[0], n // dims[0], 1), (1, 1, n),
                            (dims[0] * 2, n // dims[0] // 2), (n, 1, 1, 1)])
        out = bytearray([0, 0, raw[2], len(value)]) + struct.pack(f">{len(value)}I", *value) + raw[4 + 4 * ndim:]
    return bytes(out), f"{op} -> {value}"


def _damage_idx(rng: random.Random, path: Path, data: bytes) -> str:
    body, what = make_idx_lie(rng, data)
    path.write_bytes(body)
    return f"{path.name}: {what}"


def _damage_idx_gz(rng: random.Random, path: Path, data: bytes) -> str:
    """Half the time the IDX inside lies (then compressed again), else the gzip stream itself is damaged."""
    if rng.random() < 0.5:
        body, what = make_idx_lie(rng, gzip.decompress(data))
        path.write_bytes(gzip.compress(body, mtime=0))
        return f"{path.name}: inner {what}"
    out, op = make_gzip_damage(rng, data)
    path.write_bytes(out)
    return f"{path.name}: gzip {op} ({len(data)} -> {len(out)} bytes)"


def make_gzip_damage(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """A gzip member's flags, method, CRC or size made to lie, its deflate bytes flipped or cut, a stored block
    whose length lies, or another member or junk after it."""
    out = bytearray(data)
    op = rng.choice(["flags", "method", "crc", "isize", "flip", "flip", "cut", "stored", "member", "junk"])
    if op == "flags":
        out[3] = value = rng.choice([0x02, 0x04, 0x08, 0x10, 0x1E, 0xE0, 0xFF])
        op += f" {value:#x}"
    elif op == "method":
        out[2] = rng.choice([0, 7, 9, 255])
    elif op in ("crc", "isize"):
        at = len(out) - (8 if op == "crc" else 4)
        out[at:at + 4] = struct.pack("<I", rng.choice([0, 1, 2**32 - 1, 2**31]))
    elif op == "flip":
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(10, len(out) - 8)] ^= 1 << rng.randrange(8)
    elif op == "cut":
        out = out[: rng.randrange(10, len(out) - 8)] + (out[-8:] if rng.random() < 0.5 else b"")
    elif op == "stored":  # a stored block: BFINAL/BTYPE byte, LEN, NLEN (one's complement), the bytes
        raw = gzip.decompress(data)
        comp = zlib.compressobj(0, zlib.DEFLATED, -15)
        stream = bytearray(comp.compress(raw) + comp.flush())
        length = rng.choice([0, 1, 0xFFFF, len(raw) + 1, len(raw) - 1]) & 0xFFFF
        nlen = length ^ 0xFFFF if rng.random() < 0.7 else rng.randrange(0x10000)
        stream[1:5] = struct.pack("<HH", length, nlen)
        out = bytearray(data[:10]) + stream + struct.pack("<II", zlib.crc32(raw), len(raw))
        op += f" LEN {length} NLEN {nlen}"
    elif op == "member":
        out += gzip.compress(rng.choice([b"", b"\0", bytes(range(256)), bytes(1 << 16)]), mtime=0)
    else:
        out += rng.choice([b"\0" * rng.randint(1, 16), b"\x1f\x8b", b"\x1f\x8b\x08", bytes([rng.randrange(256)])])
    return bytes(out), op


# Odd plain objects a batch (or a meta file) may be instead: wrong types, shapes, ranges, deep nesting.
_ODD_BATCHES = [
    lambda: {b"data": np.zeros((4, 3072), np.float64), b"labels": [0, 1, 2, 3]},
    lambda: {b"data": np.full((4, 3072), np.nan, np.float32), b"labels": [0, 1, 2, 3]},
    lambda: {b"data": np.full((4, 3072), 300, np.int16), b"labels": [0, 1, 2, 3]},
    lambda: {b"data": np.full((4, 3072), -1, np.int8), b"labels": [0, 1, 2, 3]},
    lambda: {b"data": np.zeros((4, 3071), np.uint8), b"labels": [0, 1, 2, 3]},
    lambda: {b"data": np.zeros((4, 3, 1024), np.uint8), b"labels": [0, 1, 2, 3]},
    lambda: {b"data": np.zeros((0, 3072), np.uint8), b"labels": []},
    lambda: {b"data": np.zeros((4, 3072), ">u2"), b"labels": np.arange(4, dtype=">i8")},
    lambda: {b"data": np.zeros((4, 3072), np.bool_), b"labels": [0, 1, 2, 3]},
    lambda: {b"data": [[0] * 3072] * 2, b"labels": [0, 1]},
    lambda: {b"data": [[0] * 3072, [0]], b"labels": [0, 1]},
    lambda: {b"data": b"\0" * 3072, b"labels": [0]},
    lambda: {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1.5]},
    lambda: {b"data": np.zeros((2, 3072), np.uint8), b"labels": [2**64, -1]},
    lambda: {b"data": np.zeros((2, 3072), np.uint8), b"labels": np.array([0, 1], np.uint64) + np.uint64(2**63)},
    lambda: {b"data": np.zeros((2, 3072), np.uint8), b"labels": [[0], [1]]},
    lambda: {b"data": np.zeros((2, 3072), np.uint8), b"labels": "01"},
    lambda: {b"data": np.zeros((2, 3072), np.uint8), b"labels": [True, False]},
    lambda: {b"data": np.zeros((2, 3072), np.uint8)},
    lambda: {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], "data": None, "labels": 1},
    lambda: {b"label_names": [b"a"] * 10 + [None]}, lambda: {b"label_names": "x" * 10},
    lambda: {"fine_label_names": [b"\xff"] * 100}, lambda: {b"label_names": [1] * 10},
    lambda: None, lambda: [], lambda: "x", lambda: 7, lambda: {}, lambda: (np.zeros(3),),
    lambda: {b"data": np.zeros((2, 3072), np.uint8).T, b"labels": [0, 1]},
    lambda: {b"data": np.zeros((2, 3072), np.uint8)[:, ::2], b"labels": [0, 1]},
]
# Raw pickles no pickler writes: deep nesting, a list that holds itself, a dict key that is a list.
_ODD_RAW = [b"\x80\x04" + b"]" * 50000 + b"a" * 49999 + b".", b"\x80\x04](h\x00e.", b"\x80\x04}](s.",
            b"\x80\x04]\x94h\x00h\x00\x86\x94h\x01h\x01\x86\x94h\x02h\x02\x86.", b"\x80\x02N.", b"\x80\x05\x95\x00."]


class _Call:
    """Pickles as a call of ``func`` (by its module and name) on harmless arguments."""

    def __init__(self, func):
        self.func = func

    def __reduce__(self):
        return self.func, ((b"x",) if self.func is not dict else ())


def make_odd_pickle(rng: random.Random, obj: object) -> tuple[bytes, str]:
    """``obj`` (a loaded valid batch) replaced: by an odd plain object, a raw pickle no pickler writes, or the
    batch itself with one array (or the whole) written as a call to a global NumPy does not allow here:
    :func:`make_ran` (which would run were the batch unpickled normally) or a harmless callable."""
    op = rng.choice(["odd", "odd", "raw", "global"])
    protocol = rng.choice([2, 3, 4, 5])
    if op == "odd":
        new = rng.choice(_ODD_BATCHES)()
        return pickle.dumps(new, protocol=protocol), f"odd object {str(new)[:60]!r} (protocol {protocol})"
    if op == "raw":
        raw = rng.choice(_ODD_RAW)
        return raw, f"raw pickle {raw[:24]!r}"
    func = rng.choice([make_ran, make_ran, len, np.frombuffer, bytearray, dict])
    arrays = [k for k, v in obj.items() if isinstance(v, np.ndarray)] if isinstance(obj, dict) else []
    if arrays and rng.random() < 0.6:  # one array (the batch's data) written as the call, else the whole batch
        obj = {**obj, arrays[0]: _Call(func)}
    else:
        obj = _Call(func)
    body = pickle.dumps(obj, protocol=protocol)
    return body, f"global {func.__module__}.{func.__name__} (protocol {protocol})"


_STRINGS = ["", "x", "u1", "O", "O8", "V8", "S4", "U2", "M8[s]", "f8", "<f4", ">u2", "i8", "b1", "|", "<", ">",
            "x" * 300, "builtins", "numpy", "numpy.core.multiarray", "collections", "data", "labels", "fine_labels",
            "label_names", "\xe9", "u1,u1", "(2,)u1"]
_LENGTHS = {"SHORT_BINBYTES": "<B", "SHORT_BINUNICODE": "<B", "SHORT_BINSTRING": "<B", "BINBYTES": "<I",
            "BINUNICODE": "<I", "BINSTRING": "<i", "BINBYTES8": "<Q", "BINUNICODE8": "<Q", "BYTEARRAY8": "<Q",
            "FRAME": "<Q"}
_OPCODES = b"02(.]})NsuaebRt\x85\x86\x87\x941\x81\x92\x93ld\x8f\x90\x91\x97\x98\x88KhqX\x8c"


def make_opcode_lie(rng: random.Random, body: bytes) -> tuple[bytes, str]:
    """One opcode of ``body`` made to lie: a length field (the bytes it counts unchanged), the opcode itself
    another, a memo index another, a string another (a dtype code, byte order, key, module or name)."""
    ops = list(pickletools.genops(body))
    op = rng.choice(["length", "length", "opcode", "opcode", "memo", "string", "string", "int"])
    lengths = [(o.name, pos) for o, _, pos in ops if o.name in _LENGTHS]
    memos = [(o.name, pos) for o, _, pos in ops if o.name in ("BINGET", "BINPUT", "LONG_BINGET", "LONG_BINPUT")]
    strings = [(pos, arg) for o, arg, pos in ops if o.name in ("SHORT_BINUNICODE", "BINUNICODE")]
    if op == "length" and lengths:
        name, pos = rng.choice(lengths)
        fmt = _LENGTHS[name]
        (n,) = struct.unpack_from(fmt, body, pos + 1)
        limit = 2 ** (8 * struct.calcsize(fmt) - (fmt == "<i"))
        value = rng.choice([0, 1, n - 1, n + 1, 2 * n, limit - 1, *[h for h in HUGE_INTS if h < limit]]) % limit
        return body[:pos + 1] + struct.pack(fmt, value) + body[pos + 1 + struct.calcsize(fmt):], f"{name} at {pos}: length {n} -> {value}"
    if op == "memo" and memos:
        name, pos = rng.choice(memos)
        wide = name.startswith("LONG")
        value = rng.choice([0, 1, 7, 200, 255] + ([2**31 - 1, 2**32 - 1, 65536] if wide else []))
        return body[:pos + 1] + struct.pack("<I" if wide else "<B", value) + body[pos + (5 if wide else 2):], f"{name} at {pos} -> {value}"
    if op == "string" and strings:
        pos, arg = rng.choice(strings)
        new = rng.choice(_STRINGS).encode()
        old = len(arg.encode()) + (2 if body[pos] == 0x8C else 5)
        enc = b"\x8c" + bytes([len(new)]) + new if len(new) < 256 else b"X" + struct.pack("<I", len(new)) + new
        return body[:pos] + enc + body[pos + old:], f"string {arg[:20]!r} at {pos} -> {new[:20]!r}"
    if op == "int" and any(o.name.startswith("BININT") for o, _, _ in ops):
        return make_pickle_lie(rng, body)
    o, _, pos = rng.choice(ops[1:] or ops)
    new = rng.choice(_OPCODES)
    return body[:pos] + bytes([new]) + body[pos + 1:], f"opcode {o.name} at {pos} -> {bytes([new])!r}"


def _damage_pickle(rng: random.Random, path: Path, data: bytes) -> str:
    """The batch written again at another protocol (2, 3, 5 or 4) and one opcode made to lie, or the whole
    replaced (:func:`make_odd_pickle`)."""
    obj = pickle.loads(data)  # noqa: S301 - the valid file this case just wrote
    if rng.random() < 0.3:
        body, what = make_odd_pickle(rng, obj)
    else:
        protocol = rng.choice([2, 3, 4, 5])
        body, what = make_opcode_lie(rng, pickle.dumps(obj, protocol=protocol))
        what = f"protocol {protocol}, {what}"
    path.write_bytes(body)
    return f"{path.name}: {what}"


def _chunks(data: bytes) -> list[list]:
    """A PNG's chunks as [type, body] after the 8-byte signature (lengths and CRCs recomputed when written)."""
    out, at = [], 8
    while at + 8 <= len(data):
        (n,) = struct.unpack_from(">I", data, at)
        out.append([data[at + 4:at + 8], bytearray(data[at + 8:at + 8 + n])])
        at += 12 + n
    return out


def _png(chunks: list[list]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(b)) + t + bytes(b) + struct.pack(">I", zlib.crc32(t + b))
                                          for t, b in chunks)


def _damage_png(rng: random.Random, path: Path, data: bytes) -> str:
    """IHDR fields set to lies, a chunk's body flipped or cut (its CRC made right), a chunk dropped, renamed or
    repeated, a text chunk that inflates to 64 MB, or one length field lying (its CRC then wrong)."""
    chunks = _chunks(data)
    op = rng.choice(["ihdr", "ihdr", "ihdr", "flip", "cut", "drop", "rename", "repeat", "bomb", "length"])
    if op == "ihdr":
        field, at, fmt = rng.choice([("width", 0, ">I"), ("height", 4, ">I"), ("depth", 8, ">B"), ("color", 9, ">B"),
                                     ("method", 10, ">B"), ("interlace", 12, ">B")])
        value = rng.choice([0, 1, 2**31 - 1, 2**32 - 1, 65535, 10000, 20000, 7] if fmt == ">I" else [0, 1, 2, 3, 4, 5, 6, 7, 16, 255])
        struct.pack_into(fmt, chunks[0][1], at, value % (2**32 if fmt == ">I" else 256))
        what = f"IHDR {field} -> {value}"
    elif op in ("flip", "cut", "drop", "rename", "repeat"):
        i = rng.randrange(len(chunks))
        what = f"chunk {chunks[i][0].decode()} {op}"
        if op == "flip" and chunks[i][1]:
            chunks[i][1][rng.randrange(len(chunks[i][1]))] ^= 1 << rng.randrange(8)
        elif op == "cut":
            chunks[i][1] = chunks[i][1][: rng.randrange(len(chunks[i][1]) + 1)]
        elif op == "drop":
            del chunks[i]
        elif op == "rename":
            chunks[i][0] = rng.choice([b"IDAx", b"abcd", b"IHDR", b"IEND", b"PLTE", b"tRNS", b"IDAT", b"\0\0\0\0"])
            what += f" to {chunks[i][0]!r}"
        else:
            chunks.insert(i, [chunks[i][0], bytearray(chunks[i][1])])
    elif op == "bomb":
        kind = rng.choice([b"zTXt", b"iCCP", b"IDAT", b"iTXt"])
        head = {b"zTXt": b"k\0\0", b"iCCP": b"p\0\0", b"iTXt": b"k\0\1\0\0\0", b"IDAT": b""}[kind]
        chunks.insert(rng.randrange(1, len(chunks)), [kind, bytearray(head + zlib.compress(bytes(64 << 20), 9))])
        what = f"{kind.decode()} inflating to 64 MB"
    else:
        out, at = bytearray(data), 8
        for _ in range(rng.randrange(len(chunks))):
            at += 12 + struct.unpack_from(">I", out, at)[0]
        struct.pack_into(">I", out, at, value := rng.choice([0, 1, 2**31 - 1, 2**32 - 1, 100]))
        path.write_bytes(bytes(out))
        return f"{path.name}: length at {at} -> {value}"
    path.write_bytes(_png(chunks))
    return f"{path.name}: {what}"


def _damage_pgm(rng: random.Random, path: Path, data: bytes) -> str:
    """The P5 header's magic, width, height or maxval made to lie, or a comment added (the pixels unchanged)."""
    head = data.split(b"\n", 3)  # b"P5", b"5 6", b"255", pixels
    op = rng.choice(["magic", "size", "size", "maxval", "maxval", "comment"])
    if op == "magic":
        head[0] = rng.choice([b"P2", b"P4", b"P6", b"P7", b"P1", b"PX", b"P"])
    elif op == "size":
        w, h = head[1].split()
        lie = rng.choice([b"0", b"1", b"-1", b"99999999", b"2147483648", b"x", b"1e3", b"65536"])
        head[1] = lie + b" " + h if rng.random() < 0.5 else w + b" " + lie
    elif op == "maxval":
        head[2] = rng.choice([b"0", b"1", b"256", b"65535", b"65536", b"2147483648", b"-5", b""])
    else:
        head[1] = b"# " + bytes(rng.randrange(32, 127) for _ in range(rng.choice([1, 100, 10000]))) + b"\n" + head[1]
    path.write_bytes(b"\n".join(head))
    return f"{path.name}: {op} -> {b' '.join(head[:3])[:60]!r}"


def _damage_jpeg(rng: random.Random, path: Path, data: bytes) -> str:
    """A marker segment's length, or the frame's height, width or component count, made to lie."""
    out = bytearray(data)
    segments, at = [], 2
    while at + 4 <= len(data) and data[at] == 0xFF and data[at + 1] != 0xDA:
        segments.append(at)
        at += 2 + struct.unpack_from(">H", data, at + 2)[0]
    sof = next(s for s in segments if data[s + 1] == 0xC0)
    op = rng.choice(["height", "width", "components", "precision", "length", "length"])
    if op == "length":
        at = rng.choice(segments)
        struct.pack_into(">H", out, at + 2, value := rng.choice([0, 1, 2, 3, 0xFFFF, 100]))
        op = f"segment {data[at + 1]:#x} length"
    elif op in ("height", "width"):
        struct.pack_into(">H", out, sof + (5 if op == "height" else 7), value := rng.choice([0, 1, 0xFFFF, 30000]))
    elif op == "components":
        out[sof + 9] = value = rng.choice([0, 2, 4, 255])
    else:
        out[sof + 4] = value = rng.choice([0, 12, 16, 255])
    path.write_bytes(bytes(out))
    return f"{path.name}: {op} -> {value}"


def _damage_bmp(rng: random.Random, path: Path, data: bytes) -> str:
    """A BITMAPINFOHEADER field (width, height, bit count, compression, colours used, header size) or the
    pixel offset made to lie."""
    out = bytearray(data)
    field, at, fmt, values = rng.choice([
        ("offset", 10, "<I", [0, 1, 2**31, 2**32 - 1, len(data)]), ("header", 14, "<I", [0, 12, 64, 108, 124, 2**31]),
        ("width", 18, "<i", [0, -5, 2**31 - 1, 30000, 1]), ("height", 22, "<i", [0, -6, -(2**31), 2**31 - 1, 30000]),
        ("planes", 26, "<H", [0, 2, 0xFFFF]), ("bits", 28, "<H", [0, 1, 4, 7, 8, 16, 32, 64, 0xFFFF]),
        ("compression", 30, "<I", [1, 2, 3, 4, 5, 6, 99]), ("colours", 46, "<I", [1, 256, 2**31, 2**32 - 1])])
    struct.pack_into(fmt, out, at, value := rng.choice(values))
    path.write_bytes(bytes(out))
    return f"{path.name}: {field} -> {value}"


_SPECIAL = {"idx": _damage_idx, "idx-gz": _damage_idx_gz, "pickle": _damage_pickle, "png": _damage_png,
            "pgm": _damage_pgm, "jpeg": _damage_jpeg, "bmp": _damage_bmp}


# ---------------------------------------------------------------- checks


def check_loads(made: Made, damaged: Path, seconds: float = 5.0, memory: int = 1 << 30) -> str:
    """Load ``made``: returns "loaded" or the AtlasError's message. Anything else (another exception, a hang, a
    huge allocation, a dataset not of the expected form, a CIFAR global that ran) raises. The message must be one
    line naming the damaged file."""
    from PIL import EpsImagePlugin

    RAN.clear()
    ghostscript, EpsImagePlugin.Ghostscript = EpsImagePlugin.Ghostscript, make_ran  # an EPS must never reach it
    try:
        return _check_loads(made, damaged, seconds, memory)
    finally:
        EpsImagePlugin.Ghostscript = ghostscript


def _check_loads(made: Made, damaged: Path, seconds: float, memory: int) -> str:
    with check_limits(seconds, memory):
        try:
            check_dataset(made.load(), made)
            message = "loaded"
        except AtlasError as e:
            message = str(e)
    assert not RAN, f"a CIFAR batch's global, or Ghostscript, ran: {str(RAN)[:200]}"
    if message == "loaded":
        return message
    assert "\n" not in message, f"two lines: {message!r}"
    assert "MemoryError" not in message and "allocate" not in message, f"believed a size it was told: {message!r}"
    assert str(damaged) in message, f"does not name {damaged}: {message!r}"
    return message


def check_dataset(ds, made: Made) -> None:
    """(N, C, H, W) float32 pixels in [0, 1], N int64 labels in [0, K), K class names."""
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64, (ds.x.dtype, ds.y.dtype)
    assert ds.x.ndim == 4 and ds.x.shape[1] == made.channels and ds.x.shape[0] == len(ds.y) <= made.most, ds.x.shape
    assert made.size is None or tuple(ds.x.shape[2:]) == made.size, ds.x.shape
    assert len(ds.classes) == made.classes and all(isinstance(c, str) for c in ds.classes), ds.classes
    assert bool(torch.isfinite(ds.x).all()) and (not ds.x.numel() or 0 <= float(ds.x.min()) <= float(ds.x.max()) <= 1)
    assert not len(ds.y) or 0 <= int(ds.y.min()) <= int(ds.y.max()) < made.classes, ds.y
