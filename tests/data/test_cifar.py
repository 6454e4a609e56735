import codecs
import pickle

import numpy as np
import pytest

from modelatlas.data import load_dataset
from modelatlas.data.cifar import safe_unpickle
from modelatlas.errors import CheckpointError, DatasetNotFoundError, UnsafeCheckpointError


def make_cifar10(root, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(range(n)),
                 b"batch_label": b"x"}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    names = [f"c{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=4))
    return root


def test_cifar10_loads_fake_batches(tmp_path):
    tr = load_dataset("cifar10", "train", root=make_cifar10(tmp_path))
    assert tr.x.shape == (20, 3, 32, 32) and tr.classes[3] == "c3" and tr.y[:4].tolist() == [0, 1, 2, 3]


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.zeros((3, 3072), np.uint8)
    for split in ("train", "test"):
        (folder / split).write_bytes(pickle.dumps({"data": data, "fine_labels": [0, 50, 99]}, protocol=4))
    te = load_dataset("cifar100", "test", root=tmp_path)
    assert te.y.tolist() == [0, 50, 99] and te.num_classes == 100


class _Evil:
    def __reduce__(self):
        return (builtins_exec, ("open('PWNED','w').write('x')",))


builtins_exec = exec


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil()}, protocol=4))
    with pytest.raises(UnsafeCheckpointError, match=r"data_batch_1: refused global builtins\.exec"):
        safe_unpickle(path)
    assert not (tmp_path / "PWNED").exists()


def make_batch():
    return {b"data": np.arange(2 * 3072).reshape(2, 3072).astype(np.uint8), b"labels": [0, 1],
            b"batch_label": b"mine", b"empty": b"", b"f": np.asfortranarray(np.arange(6, dtype=">f4").reshape(2, 3))}


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_batch_of_pickle_protocol_2_or_5_loads_as_protocol_3(tmp_path, protocol):
    """Protocol 2 writes bytes through _codecs.encode and protocol 5 (pickle.HIGHEST_PROTOCOL) arrays through
    NumPy's _frombuffer: both were refused (save the batch again); they load through checked stand-ins now."""
    (tmp_path / "p3").write_bytes(pickle.dumps(make_batch(), protocol=3))
    (tmp_path / "px").write_bytes(pickle.dumps(make_batch(), protocol=protocol))
    want, got = safe_unpickle(tmp_path / "p3"), safe_unpickle(tmp_path / "px")
    assert got.keys() == want.keys() and got[b"labels"] == [0, 1] and got[b"batch_label"] == b"mine"
    assert got[b"empty"] == b""  # protocol 2: bytes() with no argument (was refused: a global bytes)
    for key in (b"data", b"f"):
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key])
    assert got[b"f"][1].tolist() == [3.0, 4.0, 5.0] and got[b"data"][1, 0] == 3072 % 256


def make_reduce_pickle(func, args):
    """A pickle (protocol 5) of {b"data": func(*args)}, written as a crafted file would be."""
    import io

    class Pickler(pickle.Pickler):
        def reducer_override(self, o):
            return (func, args) if o is _MARK else NotImplemented

    f = io.BytesIO()
    Pickler(f, protocol=5).dump({b"data": _MARK})
    return f.getvalue()


_MARK = object()
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # numpy.core or numpy._core .numeric._frombuffer


@pytest.mark.parametrize("func, args, refused", [
    (codecs.encode, ("abc", "rot13"), r"refused _codecs\.encode\(str, 'rot13'\)"),
    (codecs.encode, (b"abc", "latin1"), r"refused _codecs\.encode\(bytes, 'latin1'\)"),
    (bytes, (3,), r"refused bytes\(\) of 1 argument"),
    (_FROMBUFFER, (bytearray(16), np.dtype(object), (2,), "C"), r"refused dtype"),
    (_FROMBUFFER, (bytearray(4), np.dtype(np.uint8), (2,), "K"), r"refused _frombuffer arguments"),
])
def test_the_protocol_2_and_5_globals_admit_only_what_pickle_writes(tmp_path, func, args, refused):
    path = tmp_path / "crafted_batch"
    path.write_bytes(make_reduce_pickle(func, args))
    with pytest.raises(UnsafeCheckpointError, match=rf"crafted_batch: {refused}"):
        safe_unpickle(path)


def test_a_protocol_5_array_whose_shape_does_not_match_its_buffer_names_the_file(tmp_path):
    path = tmp_path / "short_batch"
    path.write_bytes(make_reduce_pickle(_FROMBUFFER, (bytearray(5), np.dtype(np.uint8), (2, 3), "C")))
    with pytest.raises(CheckpointError, match=r"short_batch: corrupt array .*\(2, 3\) of uint8 does not match "
                                              r"its 5 bytes"):
        safe_unpickle(path)


def test_a_folder_with_some_of_the_training_batches_says_all_are_needed_and_how_to_read_one(tmp_path):
    """A user's own batch saved as data_batch_1 was told to pass --data-root to the folder it had been given."""
    folder = make_cifar10(tmp_path) / "cifar-10-batches-py"
    for i in (2, 3, 4, 5):
        (folder / f"data_batch_{i}").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"data_batch_2 not found: the folder holds 1 of the 5 training "
                                                   r"batches \(data_batch_1, .*\), and CIFAR-10 needs them all; for "
                                                   r"batches of your own, read each with modelatlas.data.cifar.safe_unpickle"):
        load_dataset("cifar10", "train", root=tmp_path)
    assert len(load_dataset("cifar10", "test", root=tmp_path)) == 4  # the test batch is whole


def test_object_array_is_refused(tmp_path):
    path = tmp_path / "obj"
    path.write_bytes(pickle.dumps({"data": np.array([1, "a"], dtype=object)}, protocol=4))
    with pytest.raises(UnsafeCheckpointError, match="obj: refused"):
        safe_unpickle(path)


def test_cifar_missing_root_says_pass_root(tmp_path, monkeypatch):
    monkeypatch.delenv("ATLAS_CIFAR10", raising=False)
    with pytest.raises(DatasetNotFoundError, match=r"pass --data-root DIR \(root="):
        load_dataset("cifar10")
    with pytest.raises(DatasetNotFoundError, match="data_batch_1 not found"):
        load_dataset("cifar10", root=tmp_path)


def make_array_pickle(obj, dtype_state=None):
    """Pickle ``obj`` with every array and dtype written as Python 2 numpy did (bytes type codes, as the
    official CIFAR batches read with encoding="bytes"); ``dtype_state`` replaces each dtype's state."""
    import io

    reconstruct = np.zeros(1).__reduce__()[0]  # numpy.core or numpy._core .multiarray._reconstruct

    class Pickler(pickle.Pickler):
        def reducer_override(self, o):
            if isinstance(o, np.ndarray):
                fortran = o.flags.f_contiguous and not o.flags.c_contiguous
                return reconstruct, (np.ndarray, (0,), b"b"), (1, o.shape, o.dtype, fortran, o.tobytes(order="A"))
            if isinstance(o, np.dtype):
                state = dtype_state or (3, o.str[:1].encode(), None, None, None, -1, -1, 0)
                return np.dtype, (o.str[1:].encode(), False, True), state
            return NotImplemented

    f = io.BytesIO()
    Pickler(f, protocol=3).dump(obj)
    return f.getvalue()


def test_python2_style_arrays_round_trip(tmp_path):
    arrays = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"be": np.arange(3, dtype=">i4"),
              b"f": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)), b"labels": [1, 2]}
    (tmp_path / "batch").write_bytes(make_array_pickle(arrays))
    out = safe_unpickle(tmp_path / "batch")
    for k in (b"data", b"be", b"f"):
        assert out[k].dtype == arrays[k].dtype and np.array_equal(out[k], arrays[k])
    assert out[b"labels"] == [1, 2]


@pytest.mark.parametrize("state", [
    (3, b"|", (np.dtype("u1"), (100000,)), None, None, -1, -1, 0),  # subarray: itemsize 1 but 100000 elements
    (3, b"|", ("x",), {"x": (np.dtype("u1"), 0)}, None, 8, 1, 0),  # fields forced onto a plain type
])
def test_crafted_dtype_state_is_refused(tmp_path, state):
    """numpy's dtype __setstate__ trusts its input: a crafted state builds an inconsistent dtype, or crashes
    the interpreter (state (3, '|', (None, None), -1, -1, 0) segfaults numpy 2.4), so it must never run."""
    (tmp_path / "batch").write_bytes(make_array_pickle({b"data": np.zeros(4, np.uint8)}, dtype_state=state))
    with pytest.raises(UnsafeCheckpointError, match=r"batch: refused"):
        safe_unpickle(tmp_path / "batch")


def test_absurd_frame_length_names_the_file(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x04\x95" + b"\xff" * 8 + b"}.")  # FRAME of 2**64 - 1 bytes
    with pytest.raises(CheckpointError, match=r"data_batch_1: not a readable CIFAR batch"):
        safe_unpickle(path)


def test_cifar_num_classes_is_10_or_100(tmp_path):
    from modelatlas.data.cifar import load_cifar
    from modelatlas.errors import ConfigError

    with pytest.raises(ConfigError, match=r"num_classes=20: CIFAR has 10 .* or 100"):
        load_cifar("train", root=tmp_path, num_classes=20)


def test_cifar10_has_no_num_classes_option(tmp_path):
    """load_dataset("cifar10", num_classes=100) loaded CIFAR-100 named 'cifar100', whose saved dataset_kwargs
    (num_classes, an option 'cifar100' does not take) then failed to reload for re-evaluation."""
    from modelatlas.errors import ConfigError

    with pytest.raises(ConfigError, match="dataset 'cifar10' has no option 'num_classes'; its options: root$"):
        load_dataset("cifar10", "train", root=tmp_path, num_classes=100)


@pytest.mark.parametrize("names", [7, [b"a"] * 9 + [3], {"x": 1}])
def test_malformed_label_names_in_the_meta_file_are_named(tmp_path, names):
    folder = make_cifar10(tmp_path) / "cifar-10-batches-py"
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=4))
    with pytest.raises(CheckpointError, match="batches.meta.*'label_names' must be a list of 10 class names"):
        load_dataset("cifar10", "train", root=tmp_path)


def test_cifar_root_that_is_the_archive_says_to_extract_it(tmp_path):
    """--data-root cifar-10-python.tar.gz said '.../cifar-10-python.tar.gz/data_batch_1 not found'."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(DatasetNotFoundError, match=f"cifar10: {archive} is a file, not a folder; extract the archive "
                                                   r"\(tar xzf\) and pass the folder it makes"):
        load_dataset("cifar10", "train", root=archive)


def test_setitem_on_a_list_names_the_file(tmp_path):
    """SETITEM on a list (a damaged batch) raised IndexError from inside the unpickler: a traceback."""
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x04]K\x01K\x02s.")  # [] ; 1 ; 2 ; SETITEM
    with pytest.raises(CheckpointError, match=r"data_batch_1: not a readable CIFAR batch \(IndexError"):
        safe_unpickle(path)


@pytest.mark.parametrize("raw,message", [
    (b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b".", r"not a readable CIFAR batch \(ValueError: expected 1099511627776 bytes"),
    (b"\x80\x04K\x01r\xff\xff\xff\x7f.", r"memo index 2147483647 at byte 4 is past the end of the file"),
])
def test_sizes_the_file_cannot_hold_are_refused_before_allocating(tmp_path, raw, message):
    """BINBYTES8 declaring 2**40 bytes, or LONG_BINPUT 2**31 - 1 (a memo of 2**32 slots), made the unpickler
    allocate that much first: a MemoryError traceback, or gigabytes taken where the allocation succeeds."""
    path = tmp_path / "data_batch_1"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match="data_batch_1: " + message):
        safe_unpickle(path)


@pytest.mark.parametrize("name", ["data_batch_3", "batches.meta"])
def test_a_folder_in_place_of_a_batch_says_so(tmp_path, name):
    """A folder named data_batch_3 was reported as 'data_batch_3 not found', one named batches.meta gave the
    classes "0".."9" silently (the damage 'a folder in place of the file' of the loaders' fuzzer)."""
    path = make_cifar10(tmp_path) / "cifar-10-batches-py" / name
    path.unlink()
    path.mkdir()
    with pytest.raises(CheckpointError, match=f"{path}: is a folder, not a file of CIFAR batches"):
        load_dataset("cifar10", "train", root=tmp_path)
