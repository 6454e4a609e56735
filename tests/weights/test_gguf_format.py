import gc
import os
import sys

import numpy as np
import pytest
import torch
from tests.weights.conftest import make_byte_counter, make_gguf_file

from modelatlas.errors import CheckpointError, TensorNotFoundError
from modelatlas.weights import open_checkpoint

gguf = pytest.importorskip("gguf")

F32 = np.arange(6, dtype=np.float32).reshape(2, 3)
F16 = np.linspace(-1, 1, 20, dtype=np.float16).reshape(4, 5)
Q = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)


def make_gguf(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("f32", F32)
    w.add_tensor("f16", F16)
    q8 = gguf.quants.quantize(Q, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_round_trip_with_numpy_shapes(tmp_path):
    with open_checkpoint(make_gguf(tmp_path / "llm.gguf")) as ck:
        assert ck.name == "llm" and ck.format == "gguf"
        assert [(t.name, t.shape, t.dtype) for t in ck.tensors()] == [
            ("f32", (2, 3), "float32"), ("f16", (4, 5), "float16"), ("q8", (3, 64), "float32")]
        assert torch.equal(ck.read("f32"), torch.from_numpy(F32))
        assert torch.equal(ck.read("f16"), torch.from_numpy(F16))  # its real dtype: a float16 copy is seen as one
        q8 = ck.read("q8")
        assert q8.dtype == torch.float32 and q8.shape == (3, 64)
        # Q8_0: per block of 32, scale = max|x| / 127, so the error is at most half a step.
        step = np.abs(Q).reshape(3, 2, 32).max(axis=2, keepdims=True) / 127
        assert np.all(np.abs(q8.numpy() - Q).reshape(3, 2, 32) <= step * 0.5 + 1e-3)


def test_truncated_and_garbage(tmp_path):
    good = make_gguf(tmp_path / "good.gguf").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 60)
    for name in ("trunc.gguf", "junk.gguf"):
        with pytest.raises(CheckpointError, match=rf"{name}: corrupt or truncated GGUF file") as info:
            open_checkpoint(tmp_path / name)
        assert "\n" not in str(info.value)


def test_missing_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    p = make_gguf(tmp_path / "llm.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(CheckpointError, match=r"llm\.gguf: .*pip install modelatlas\[gguf\]"):
        open_checkpoint(p)


def test_float64_tensor_reads_as_float32(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "f64.gguf"), "llama")
    w.add_tensor("f64", np.arange(6, dtype=np.float64).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_checkpoint(tmp_path / "f64.gguf") as ck:
        assert ck.info("f64").dtype == "float32"
        assert torch.equal(ck.read("f64"), torch.arange(6.0).reshape(2, 3))


def check_is_open(path) -> bool:
    """Whether this process holds ``path`` open or memory-mapped (Linux: /proc/self/fd, /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        if any(line.rstrip("\n").endswith(str(path)) for line in f):
            return True
    return any(os.path.realpath(f"/proc/self/fd/{fd}") == str(path) for fd in os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc/self (Linux)")
def test_close_releases_the_file_and_reads_reopen(tmp_path):
    p = make_gguf(tmp_path / "llm.gguf").resolve()
    ck = open_checkpoint(p)
    assert torch.equal(ck.read("f32"), torch.from_numpy(F32))
    assert check_is_open(p)
    kept = ck.read("f16")  # a tensor the caller keeps must not pin the file
    ck.close()
    gc.collect()
    assert not check_is_open(p)
    assert torch.equal(kept, torch.from_numpy(F16.astype(np.float32)))
    assert torch.equal(ck.read("f32"), torch.from_numpy(F32))  # reopened on demand, like the other readers
    ck.close()


def test_a_gguf_file_cut_short_after_it_was_opened_says_so(tmp_path):
    # through the memory map of sessions 24-30 the missing bytes read as zeros (or a SIGBUS past a page)
    p = make_gguf(tmp_path / "llm.gguf")
    with open_checkpoint(p) as ck:
        last = max(ck.keys(), key=lambda n: ck._tensors[n].offset)
        os.truncate(p, ck._tensors[last].offset + 1)  # one byte of the last tensor left
        with pytest.raises(CheckpointError, match=rf"llm\.gguf: cannot read tensor '{last}': the file ends \d+ bytes "
                                                  r"short of it"):
            ck.read(last)


def test_bf16_keeps_its_dtype(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    b = gguf.quants.quantize(Q[:, :32], gguf.GGMLQuantizationType.BF16)
    w.add_tensor("bf", b, raw_shape=b.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_checkpoint(tmp_path / "m.gguf") as ck:
        assert [(t.name, t.dtype) for t in ck.tensors()] == [("bf", "bfloat16")]
        assert torch.equal(ck.read("bf"), torch.from_numpy(Q[:, :32]).bfloat16())


def test_a_float16_gguf_copy_is_a_lower_precision_copy_in_lineage(tmp_path):
    from modelatlas.lineage import recover_lineage
    from modelatlas.lineage.synthetic import make_synthetic_forest

    weights, _ = make_synthetic_forest(n_trees=1, children=2, depth=1, seed=2)
    paths = []
    for name, tensors in weights.items():
        w = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), "llama")
        for k, v in tensors.items():
            w.add_tensor(k, v.numpy() if name != "t0_0" else v.half().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        paths.append(tmp_path / f"{name}.gguf")
    from safetensors.torch import save_file

    save_file(weights["t0_0"], str(tmp_path / "t0_0-f32.safetensors"))
    f = recover_lineage([*paths, tmp_path / "t0_0-f32.safetensors"], stage="specialize")
    assert f.decisions["precision_copies"] == {"t0_0": "float16"}


def make_raw_gguf(path, kvs=b"", n_kv=0, tensors=((b"w", (3, 2), 0, 0),), data=None, version=3,
                  n_tensors=None):
    """A GGUF file written byte by byte, so its counts, lengths and offsets can lie. ``tensors``: (name, ggml
    dims, ggml type, offset)."""
    import struct

    def s(b):
        return struct.pack("<Q", len(b)) + b
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors, n_kv) + kvs
    for name, dims, gtype, off in tensors:
        out += s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, gtype, off)
    path.write_bytes(out + b"\0" * (-len(out) % 32) + (F32.tobytes() if data is None else data))
    return path


def test_lying_counts_and_offsets_are_named_not_followed(tmp_path):
    import struct

    cases = {  # each used to hang (an array of 2^62 items past the end), or fail with numpy's words
        "array.gguf": dict(kvs=struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 0, 2**62), n_kv=1),
        "kvs.gguf": dict(n_kv=2**63), "tensors.gguf": dict(n_tensors=2**63),
        "name.gguf": dict(kvs=struct.pack("<Q", 2**62) + b"k", n_kv=1),
        "offset.gguf": dict(tensors=((b"w", (3, 2), 0, 10**6),)),
        "dims.gguf": dict(tensors=((b"w", (2**40, 2**40), 0, 0),)),
        "type.gguf": dict(tensors=((b"w", (3, 2), 999, 0),)),
        "version.gguf": dict(version=99)}
    messages = {"array.gguf": r"array of key 'k' at byte \d+ needs 4611686018427387904 bytes",
                "offset.gguf": r"tensor 'w' \(F32, shape \(2, 3\)\) needs bytes", "type.gguf": "unknown ggml type 999",
                "dims.gguf": r"tensor 'w' \(F32, shape \(1099511627776, 1099511627776\)\)",
                "version.gguf": "unsupported GGUF version 99"}
    for name, kw in cases.items():
        with pytest.raises(CheckpointError, match=rf"{name}: corrupt or truncated GGUF file: .*"
                                                  rf"{messages.get(name, 'needs')}") as info:
            open_checkpoint(make_raw_gguf(tmp_path / name, **kw))
        assert "\n" not in str(info.value)


def test_metadata_items_cost_no_memory_per_item(tmp_path):
    import struct
    import tracemalloc

    n = 200_000  # one-byte array items: gguf.GGUFReader made a numpy view of each (about 180 MB here)
    kvs = struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 0, n) + b"\1" * n
    p = make_raw_gguf(tmp_path / "m.gguf", kvs=kvs, n_kv=1)
    tracemalloc.start()
    try:
        with open_checkpoint(p) as ck:
            assert torch.equal(ck.read("w"), torch.arange(6.0).reshape(2, 3))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20


def test_big_endian_file(tmp_path):
    p = str(tmp_path / "be.gguf")
    w = gguf.GGUFWriter(p, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_token_list(["a", "b"])
    w.add_tensor("f32", F32)
    w.add_tensor("i32", np.arange(4, dtype=np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_checkpoint(p) as ck:
        assert torch.equal(ck.read("f32"), torch.from_numpy(F32))
        assert torch.equal(ck.read("i32"), torch.arange(4, dtype=torch.int32))


def test_tensors_sharing_bytes_are_refused(tmp_path):
    # llama.cpp refuses a tensor that does not start where the one before it ends; two tensors read from the
    # same bytes were two copies of one weight
    path = make_raw_gguf(tmp_path / "shared.gguf", tensors=((b"a", (3,), 0, 0), (b"b", (3,), 0, 8)))
    with pytest.raises(CheckpointError, match=r"shared\.gguf: corrupt or truncated GGUF file: tensor 'b' \(bytes "
                                              r"8\.\.20 of the data\) overlaps tensor 'a' \(bytes 0\.\.12\)"):
        open_checkpoint(path)


def test_a_file_named_by_bytes_that_are_not_utf8_is_read(tmp_path, non_utf8_name):
    with open_checkpoint(make_gguf(tmp_path / f"{non_utf8_name}.gguf")) as ck:
        assert ck.name == non_utf8_name and torch.equal(ck.read("f32"), torch.from_numpy(F32))


def test_a_quantized_tensor_read_gives_its_bytes_to_the_next_call_on_it(tmp_path, monkeypatch):
    """read() keeps a quantized tensor's bytes for one call on it (rounding_variance, grid_position,
    requantized_match: each read them again); the same results as a fresh checkpoint's; no plain tensor's
    bytes kept; at most one tensor's, dropped by the next read and by close()."""
    from modelatlas.weights.byte_ranges import ByteRanges

    path, reads = make_gguf(tmp_path / "m.gguf"), []
    read_into = ByteRanges.read_into
    monkeypatch.setattr(ByteRanges, "read_into", lambda self, offset, buf, what: (
        reads.append(what), read_into(self, offset, buf, what))[1])
    calls = [lambda ck, x: ck.rounding_variance("q8", x), lambda ck, x: ck.grid_position("q8", x),
             lambda ck, x: ck.requantized_match("q8", x)]
    for call in calls:
        with open_checkpoint(path) as fresh:
            want = call(fresh, torch.from_numpy(Q))
        reads.clear()
        with open_checkpoint(path) as ck:
            x = ck.read("q8")
            got = call(ck, x if call is calls[0] else torch.from_numpy(Q))
            assert reads == ["tensor 'q8'"] and not ck._kept.has("q8")  # taken by the call
            assert torch.equal(got, want) if call is calls[0] else got == want
            ck.read("q8")
            ck.read("f32")
            assert not ck._kept.has("q8") and not ck._kept.has("f32")  # the next read dropped it; a plain tensor's are not kept
            ck.read("q8")
        assert not ck._kept.has("q8")  # close() dropped it


@pytest.mark.parametrize("n", [300, 600])  # runs of consecutive sampled rows (300), none (600)
def test_a_copy_test_reads_only_the_rows_it_samples(tmp_path, monkeypatch, n):
    """requantized_match and grid_position on 256 of n rows read those rows' bytes, not the tensor's; the
    same results as from the whole tensor's bytes (kept by read())."""
    from modelatlas.weights.byte_ranges import ByteRanges

    x = np.random.default_rng(1).standard_normal((n, 64)).astype(np.float32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)  # (n, 68): 2 blocks of 34 bytes a row
    path = make_gguf_file(tmp_path / "m.gguf", {"q": (q, "Q8_0")})
    got = []
    read_into = ByteRanges.read_into
    monkeypatch.setattr(ByteRanges, "read_into", lambda self, offset, buf, what: (
        got.append(buf.nbytes), read_into(self, offset, buf, what))[1])
    y = torch.from_numpy(x * 1.001)
    for call in (lambda ck: ck.requantized_match("q", y), lambda ck: ck.grid_position("q", y)):
        with open_checkpoint(path) as ck:
            got.clear()
            sampled = call(ck)
            assert sum(got) == 256 * 68 and (len(got) < 256) == (n == 300)  # a run of rows: one read
            ck.read("q")
            assert sampled == call(ck)  # from the whole tensor's bytes


def test_read_rows_reads_those_rows_of_each_type(tmp_path, monkeypatch):
    path = make_gguf(tmp_path / "m.gguf")
    with open_checkpoint(path) as ck:
        got = make_byte_counter(monkeypatch)
        for name, row_bytes in (("f32", 3 * 4), ("f16", 5 * 2), ("q8", 2 * 34)):  # Q8_0: 64 values, 2 blocks
            got.clear()
            rows = torch.tensor([2, 0]) if name != "f32" else torch.tensor([1])
            y = ck.read_rows(name, rows)
            assert got == {"m.gguf": len(rows) * row_bytes}
            assert y.dtype == ck.read(name).dtype and torch.equal(y, ck.read(name)[rows])
        ck.read("q8")
        ck.read_rows("q8", torch.tensor([1]))
        assert ck._kept.has("q8")  # read()'s kept bytes stay for the call that follows
        assert ck.compared_rows("f32") is None and ck.compared_rows("q8").tolist() == [0, 1, 2]


def test_a_copy_test_given_the_sampled_rows_gives_what_the_whole_tensor_gives(tmp_path):
    x = np.random.default_rng(2).standard_normal((600, 64)).astype(np.float32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0)
    path = make_gguf_file(tmp_path / "m.gguf", {"q": (q, "Q4_0")})
    y = torch.from_numpy(x * 1.002)
    with open_checkpoint(path) as ck:
        rows = ck.compared_rows("q")
        assert rows.tolist() == np.linspace(0, 599, 256).round().astype(int).tolist()
        for test in (ck.requantized_match, ck.grid_position):
            assert test("q", y[rows], rows=rows) == test("q", y) and 0 < test("q", y) < 1
        assert ck.requantized_match("q", y[:255]) is None  # neither the tensor nor its sampled rows


def test_another_models_tensor_shaped_like_the_sample_is_refused(tmp_path):
    """A whole (256, m) tensor of another model, passed for a (600, m) layer, is not its 256 sampled rows: None
    (it was taken for them by shape and got a share); the sample counts only with the rows it is."""
    x = np.random.default_rng(2).standard_normal((600, 64)).astype(np.float32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0)
    path = make_gguf_file(tmp_path / "m.gguf", {"q": (q, "Q4_0")})
    with open_checkpoint(path) as ck:
        rows = ck.compared_rows("q")
        other = torch.from_numpy(x)[rows]  # (256, 64): shaped like the sample, passed as a whole tensor
        for test in (ck.requantized_match, ck.grid_position):
            assert test("q", other) is None
            assert test("q", other, rows=rows + 1) is None  # other rows than those compared
            assert test("q", other, rows=rows) is not None
        assert ck.requantized_match("q", other, rows=rows) == 1.0


def test_an_unknown_name_raises_naming_the_file_in_the_copy_tests(tmp_path):
    """requantized_match raised a bare KeyError('nope') and rounding_variance gave None for a name the file
    lacks; both now raise read's TensorNotFoundError, naming the file."""
    x = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    path = make_gguf_file(tmp_path / "m.gguf", {"q": (gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0), "Q4_0")})
    with open_checkpoint(path) as ck:
        for call in (lambda: ck.requantized_match("nope", torch.zeros(8, 64)), lambda: ck.rounding_variance("nope")):
            with pytest.raises(TensorNotFoundError, match=r"m\.gguf.*no tensor named 'nope'"):
                call()
        assert ck.requantized_match("q", torch.from_numpy(x)) == 1.0 and ck.rounding_variance("q").shape == (8, 64)


def test_grid_match_on_the_stored_levels(tmp_path):
    """A Q4_0 layer's own source lies on its nearest levels (1.0 on the 256 sampled rows of 300); a finer rounding
    of it misses them only near a boundary; a plain F32 tensor has no grid (None)."""
    from modelatlas.zoo.gguf import quantized, save_gguf

    x, Q8 = torch.randn(300, 64, generator=torch.Generator().manual_seed(0)), gguf.GGMLQuantizationType.Q8_0
    path = save_gguf(tmp_path / "m.gguf", {"w": quantized(x, "Q4_0"), "f": x.numpy()})
    with open_checkpoint(path) as ck:
        assert ck.grid_match("w", x) == 1.0
        q8 = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), Q8), Q8))
        assert 0.95 < ck.grid_match("w", q8) < 1.0
        assert ck.grid_match("f", x) is None


@pytest.mark.parametrize("dims", [(32, 0), (0, 2)])
def test_a_quantized_tensor_of_no_values_has_no_rounding_to_test(tmp_path, dims):
    """A Q8_0 tensor of shape (0, 32) or (2, 0) (fuzz case: a dimension of the header set to 0) read as empty,
    then its rounding variance, grid and least-squares tests failed with numpy's or torch's reshape error."""
    p = make_raw_gguf(tmp_path / "e.gguf", tensors=((b"q", dims, 8, 0),), data=b"")
    with open_checkpoint(p) as ck:
        x = ck.read("q")
        assert x.shape == dims[::-1] and ck.quantization("q") == "Q8_0"
        assert ck.rounding_variance("q", x) is None and ck.rounding_variance("q") is None
        assert ck.least_squares("q") is None and ck.grid_position("q", x) is None
        assert ck.grid_match("q", x) is None and ck.requantized_match("q", x) is None
