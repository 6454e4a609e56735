import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file
from tests.weights.conftest import make_byte_counter

from modelatlas.errors import CheckpointError, TensorNotFoundError, UnknownFormatError
from modelatlas.weights import discover_models, open_checkpoint


def make_file(path, **tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_lists_without_reading_and_reads_one(tmp_path):
    p = make_file(tmp_path / "m.safetensors", a=torch.ones(2, 3), b=torch.zeros(4, dtype=torch.float16))
    with open_checkpoint(p) as ck:
        assert ck.name == "m"
        assert [(t.name, t.shape, t.dtype) for t in ck.tensors()] == [("a", (2, 3), "float32"), ("b", (4,), "float16")]
        assert torch.equal(ck.read("a"), torch.ones(2, 3))
        with pytest.raises(TensorNotFoundError, match="no tensor named 'c'"):
            ck.read("c")


def test_truncated_file_names_the_file(tmp_path):
    p = make_file(tmp_path / "t.safetensors", a=torch.ones(100))
    p.write_bytes(p.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match=r"t\.safetensors: truncated"):
        open_checkpoint(p)


def test_truncated_header_says_what_is_short(tmp_path):
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", 8) + b'{"a":1}')  # 7 of the 8 header bytes: was "length 8 exceeds the file size 15"
    with pytest.raises(CheckpointError, match=r"h\.safetensors: truncated file: the header length says 8 bytes but "
                                              r"only 7 follow it \(file size 15\)$"):
        open_checkpoint(p)
    p.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(CheckpointError, match=r"length 1099511627776 is over the 104857600 bytes that safetensors"):
        open_checkpoint(p)


def test_header_that_lies_about_sizes(tmp_path):
    p = make_file(tmp_path / "lie.safetensors", a=torch.ones(4))
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n].replace(b"[4]", b"[5]")
    p.write_bytes(raw[:8] + header + raw[8 + n :])
    with pytest.raises(CheckpointError, match="header lies about tensor 'a'"):
        open_checkpoint(p)


def test_garbage_and_missing(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        open_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")
    other = tmp_path / "notes.txt"
    other.write_text("hi")
    with pytest.raises(UnknownFormatError, match="notes.txt: unknown checkpoint format"):
        open_checkpoint(other)


def test_discover_expands_folders(tmp_path):
    make_file(tmp_path / "b.safetensors", a=torch.ones(1))
    make_file(tmp_path / "a.safetensors", a=torch.ones(1))
    (tmp_path / "readme.txt").write_text("x")
    assert [p.name for p in discover_models([tmp_path])] == ["a.safetensors", "b.safetensors"]


def test_prefetch_is_a_hint_that_never_fails(tmp_path):
    path = make_file(tmp_path / "m.safetensors", a=torch.ones(64, 64), b=torch.zeros(3))
    ck = open_checkpoint(path)
    assert ck.prefetch("a") is None  # WILLNEED on the tensor's byte range
    ck.prefetch("no such tensor")  # unknown names: nothing to do
    assert torch.equal(ck.read("a"), torch.ones(64, 64))
    path.unlink()
    ck.prefetch("b")  # the file is gone: the read that follows reports it, not the hint


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": "ab", "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]},
    {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]},
])
def test_malformed_header_entry_names_file_and_tensor(tmp_path, entry):
    header = json.dumps({"a": entry}).encode()
    p = tmp_path / "odd.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 4)
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: corrupt safetensors header entry 'a'"):
        open_checkpoint(p)


@pytest.mark.parametrize("entry, shown", [
    (5, "5"), ({"dtype": "F32", "shape": [1]}, "no 'data_offsets'"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}, r"\[0, 4, 8\]"),
])
def test_a_header_entry_of_the_wrong_form_shows_it(tmp_path, entry, shown):
    """An entry that is no object, lacks a key or holds three offsets was named without what it holds."""
    p = make_raw_safetensors(tmp_path / "odd.safetensors", {"a": entry}, b"\0" * 4)
    with pytest.raises(CheckpointError, match=rf"corrupt safetensors header entry 'a': .*{shown}"):
        open_checkpoint(p)


def test_prefetch_of_an_empty_tensor_asks_for_nothing(tmp_path, monkeypatch):
    """posix_fadvise length 0 means 'to the end of the file': an empty tensor must not prefetch the rest."""
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((n, advice)), raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_WILLNEED", 3, raising=False)
    ck = open_checkpoint(make_file(tmp_path / "m.safetensors", e=torch.empty(0), a=torch.ones(64)))
    ck.prefetch("e")
    ck.prefetch("a")
    assert [n for n, advice in calls if advice == 3] == [256]


def make_file_with_metadata(path, metadata):
    """One float32 tensor ``a`` = [0, 1] with a hand-written ``__metadata__`` (save_file only writes strings)."""
    header = json.dumps({"__metadata__": metadata, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + struct.pack("<2f", 0.0, 1.0))
    return path


@pytest.mark.parametrize("metadata, message", [
    ({"format": "pt", "epoch": 3}, r"__metadata__ key 'epoch' has a non-string value 3"),
    ({"nested": {"a": "b"}}, r"__metadata__ key 'nested' has a non-string value \{'a': 'b'\}"),
    (["pt"], r"__metadata__ is a list, not an object of strings"),
])
def test_non_string_metadata_is_refused_when_opened(tmp_path, metadata, message):
    """The spec's metadata is string -> string, and safetensors itself cannot read such a file: say so at open."""
    p = make_file_with_metadata(tmp_path / "meta.safetensors", metadata)
    with pytest.raises(CheckpointError, match=rf"meta\.safetensors: corrupt safetensors header: {message}"):
        open_checkpoint(p)


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_string_or_null_metadata_is_read(tmp_path, metadata):
    with open_checkpoint(make_file_with_metadata(tmp_path / "meta.safetensors", metadata)) as ck:
        assert torch.equal(ck.read("a"), torch.tensor([0.0, 1.0]))


def make_raw_safetensors(path, header_json, data=b"\0" * 16):
    raw = header_json.encode() if isinstance(header_json, str) else json.dumps(header_json).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def f32(shape, start, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, end]}


@pytest.mark.parametrize("header, message", [
    ("[" * 100_000 + "]" * 100_000, "corrupt safetensors header: JSON nested too deeply"),  # was RecursionError
    ('{"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, '
     '"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', "corrupt safetensors header: key 'a' appears twice"),
    ({"a": f32([2, 2], 0, 16), "b": f32([2], 8, 16)}, r"header lies about tensor 'b': its bytes 8..16 overlap tensor 'a'"),
    ({"a": f32([2], 8, 16)}, r"corrupt safetensors header: 8 unused bytes before tensor 'a' \(tensors must be packed\)"),
    ({"a": f32([2], 0, 8)}, "corrupt safetensors file: 8 bytes after the last tensor that the header does not describe"),
    ({"a": f32([2**40, 2**40, 0], 0, 0), "b": f32([4], 0, 16)}, r"tensor 'a': shape \[1099511627776, 1099511627776, 0\] "
                                                                 "overflows 64-bit sizes"),
])
def test_header_problems_found_when_opened(tmp_path, header, message):
    """Each was found only by the first read (safetensors' own words, no tensor named), or not at all (a duplicate
    key: json keeps the last, other readers the first), or raised RecursionError."""
    p = make_raw_safetensors(tmp_path / "m.safetensors", header)
    with pytest.raises(CheckpointError, match=rf"m\.safetensors: {message}") as info:
        open_checkpoint(p)
    assert "\n" not in str(info.value)


def test_empty_tensors_and_padded_header_still_read(tmp_path):
    header = json.dumps({"e": f32([0], 0, 0), "a": f32([2, 2], 0, 16), "z": f32([3, 0], 16, 16)}) + "   "
    with open_checkpoint(make_raw_safetensors(tmp_path / "m.safetensors", header)) as ck:
        assert ck.read("a").shape == (2, 2) and ck.read("z").shape == (3, 0)


def test_a_file_named_by_bytes_that_are_not_utf8_is_read(tmp_path, non_utf8_name):
    """safetensors refuses such a path ("is not valid UTF-8"), so lineage recovery skipped the model."""
    p = make_file(tmp_path / "m.safetensors", a=torch.arange(6.0).reshape(2, 3))
    p = p.rename(tmp_path / f"{non_utf8_name}.safetensors")
    with open_checkpoint(p) as ck:
        assert ck.name == non_utf8_name and torch.equal(ck.read("a"), torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_dtype_reads_back_as_written(tmp_path, dtype):
    x = (torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    with open_checkpoint(make_file(tmp_path / "m.safetensors", s=torch.tensor(2.5), x=x)) as ck:
        got = ck.read("x")
        assert got.dtype == dtype and got.shape == (3, 5) and torch.equal(got.view(torch.uint8), x.view(torch.uint8))
        assert ck.read("s").shape == () and float(ck.read("s")) == 2.5


def test_a_file_cut_short_after_it_was_opened_says_so(tmp_path):
    # read through a memory map, the bytes past the new end of the file read as zeros, silently (a whole page
    # past it is a SIGBUS)
    p = make_file(tmp_path / "m.safetensors", a=torch.ones(10), b=torch.ones(1000))
    with open_checkpoint(p) as ck:
        assert torch.equal(ck.read("a"), torch.ones(10))
        os.truncate(p, p.stat().st_size - 100)
        with pytest.raises(CheckpointError, match=r"m\.safetensors: cannot read tensor 'b': the file ends 100 bytes "
                                                  r"short of it \(changed or truncated after it was opened\)"):
            ck.read("b")


def test_reads_advise_no_readahead(tmp_path, monkeypatch):
    """A tensor's own bytes are read, not the kernel's readahead around them (8 MB on the development machine:
    2.9x the bytes of the compared layers came off the disk for 1B models)."""
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append(advice), raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_RANDOM", 1, raising=False)
    with open_checkpoint(make_file(tmp_path / "m.safetensors", a=torch.ones(4), b=torch.ones(4))) as ck:
        ck.read("a")
        ck.read("b")
    assert calls == [1]


def test_a_read_returning_part_of_a_tensor_is_continued(tmp_path, monkeypatch):
    """read(2) returns at most 0x7ffff000 bytes on Linux: a tensor over 2 GiB came back short and was reported
    as a truncated file. Here every read returns at most 5 bytes."""
    if not hasattr(os, "preadv"):
        pytest.skip("no os.preadv here")
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, offset: real(fd, [memoryview(bufs[0])[:5]], offset))
    x = torch.arange(25, dtype=torch.float32)
    with open_checkpoint(make_file(tmp_path / "m.safetensors", x=x)) as ck:
        assert torch.equal(ck.read("x"), x)


@pytest.mark.parametrize("preadv", [True, False])
def test_two_threads_reading_one_checkpoint_get_their_own_tensors(tmp_path, monkeypatch, preadv):
    """A seek and a read of one shared handle could interleave with another thread's; os.preadv (or, where
    there is none, a lock: the ``preadv=False`` case runs that path here) keeps each read at its own offset.
    Both threads also start on a checkpoint not yet opened: each opened the file, and one thread's handle,
    replaced and closed, failed its read ("Bad file descriptor", seen once in CI). A thread's error fails the
    test (it was lost in the thread before). Such races depend on timing, so this checks the reads stay right
    under two threads rather than proving a race."""
    import threading

    if not preadv:
        monkeypatch.delattr(os, "preadv", raising=False)
    tensors = {f"t{i}": torch.full((1 << 14,), float(i)) for i in range(8)}
    path = make_file(tmp_path / "m.safetensors", **tensors)
    bad, errors = [], []
    for _ in range(20):  # fresh checkpoints: the first reads race to open the file
        ck = open_checkpoint(path)
        start = threading.Barrier(2)

        def reader(names, ck=ck, start=start):
            try:
                start.wait()
                for _ in range(5):
                    bad.extend(n for n in names if not torch.equal(ck.read(n), tensors[n]))
            except Exception as e:  # noqa: BLE001 (reported below, not lost in the thread)
                errors.append(repr(e))

        threads = [threading.Thread(target=reader, args=(list(tensors)[i::2],)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ck.close()
    assert errors == [] and bad == []


def test_a_file_removed_after_it_was_opened_is_named_at_the_read(tmp_path):
    """The file is opened at the first read (weights.byte_ranges): gone by then, the error names it."""
    p = make_file(tmp_path / "m.safetensors", a=torch.ones(4))
    ck = open_checkpoint(p)
    p.unlink()
    with pytest.raises(CheckpointError, match=r"m\.safetensors: cannot read file: No such file or directory"):
        ck.read("a")
    ck.prefetch("a")  # a hint: never fails


@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 4), (4,)])  # rows of the last dimension, whatever the rank
def test_read_rows_reads_only_those_rows(tmp_path, monkeypatch, shape):
    x = torch.arange(float(torch.Size(shape).numel())).reshape(shape).to(torch.bfloat16)  # bf16: exact to 256
    p = make_file(tmp_path / "m.safetensors", a=x)
    rows = torch.tensor([2, 0, 2]) if len(shape) > 1 else torch.tensor([0])  # any order, repeated
    with open_checkpoint(p) as ck:
        got = make_byte_counter(monkeypatch)
        y = ck.read_rows("a", rows)
        assert y.dtype == torch.bfloat16 and torch.equal(y, x.reshape(-1, 4)[rows])
        assert got["m.safetensors"] == (2 if len(shape) > 1 else 1) * 4 * 2  # distinct rows x 4 values x 2 bytes
        with pytest.raises(IndexError):
            ck.read_rows("a", torch.tensor([x.numel() // 4]))


def test_read_rows_of_a_scalar_is_its_one_value(tmp_path):
    p = make_file(tmp_path / "m.safetensors", s=torch.tensor(3.0))
    with open_checkpoint(p) as ck:
        assert ck.read_rows("s", torch.tensor([0])).tolist() == [[3.0]]


def test_read_rows_counts_negative_rows_from_the_end_as_indexing_does(tmp_path):
    # Checkpoint.read_rows is read(name).reshape(-1, m)[rows]: the default took row -1 as the last, the byte-range
    # readers raised IndexError; a float or bool index was cut to integers (True -> row 1) where indexing refuses
    x = torch.arange(24.0).reshape(6, 4)
    with open_checkpoint(make_file(tmp_path / "m.safetensors", a=x)) as ck:
        assert torch.equal(ck.read_rows("a", torch.tensor([-1, 0, -6])), x[[-1, 0, -6]])
        for bad in (torch.tensor([-7]), torch.tensor([1.0]), torch.tensor([True, False])):
            with pytest.raises(IndexError):
                ck.read_rows("a", bad)


def test_read_rows_of_a_tensor_of_empty_rows(tmp_path):
    # (3, 0): three rows of no value; the default raised on reshape(-1, 0), safetensors counted no rows
    x = torch.zeros(3, 0)
    with open_checkpoint(make_file(tmp_path / "m.safetensors", e=x, a=torch.ones(2, 2))) as ck:
        assert ck.read_rows("e", torch.tensor([2, 0])).shape == (2, 0)
        assert super(type(ck), ck).read_rows("e", torch.tensor([2, 0])).shape == (2, 0)  # Checkpoint's default


def test_read_rows_of_no_rows_is_empty(tmp_path):
    # an empty row list raised "self.stride(-1) must be 1 to view Byte as Float" (the default indexing gives (0, m))
    x = torch.arange(12.0).reshape(4, 3)
    with open_checkpoint(make_file(tmp_path / "m.safetensors", a=x)) as ck:
        got = ck.read_rows("a", torch.tensor([], dtype=torch.long))
        assert got.shape == (0, 3) and got.dtype == torch.float32
