import sys

import numpy as np
import pytest
import torch

from modelatlas.errors import CheckpointError
from modelatlas.weights import open_checkpoint

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

W = np.arange(6, dtype=np.float32).reshape(2, 3)
SHAPE = np.array([3, 2], dtype=np.int64)


def make_onnx(path, external=False):
    """y = reshape(x @ W^T): one float and one int64 initializer."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), helper.make_node("Reshape", ["h", "shape"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 2])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(SHAPE, "shape")])
    model = helper.make_model(graph)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("external", [False, True])
def test_initializers_are_tensors(tmp_path, external):
    with open_checkpoint(make_onnx(tmp_path / "net.onnx", external)) as ck:
        assert ck.name == "net" and ck.format == "onnx"
        assert [(t.name, t.shape, t.dtype) for t in ck.tensors()] == [("W", (2, 3), "float32"), ("shape", (2,), "int64")]
        assert torch.equal(ck.read("W"), torch.from_numpy(W))
        assert torch.equal(ck.read("shape"), torch.tensor([3, 2]))
        # the files its weights are in: the model, and its external data file (its size on disk counts both)
        assert ck.files() == [tmp_path / "net.onnx"] + ([tmp_path / "weights.data"] if external else [])


def test_missing_external_data(tmp_path):
    p = make_onnx(tmp_path / "net.onnx", external=True)
    (tmp_path / "weights.data").unlink()
    with pytest.raises(CheckpointError, match=r"net\.onnx: initializer 'W': external data file 'weights.data' is missing"):
        open_checkpoint(p).read("W")


def test_external_data_outside_folder_is_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    p = make_onnx(tmp_path / "sub" / "net.onnx", external=True)
    model = onnx.load(str(p), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.data"
    (tmp_path / "secret.data").write_bytes(b"\x00" * 64)
    onnx.save_model(model, str(p))
    with pytest.raises(CheckpointError, match="lies outside the model's folder"):
        open_checkpoint(p).read("W")


def test_corrupt_onnx(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"\xff\xfe not a protobuf" * 3)
    with pytest.raises(CheckpointError, match=r"bad\.onnx: corrupt ONNX file"):
        open_checkpoint(p)


def test_missing_onnx_package_says_how_to_install(tmp_path, monkeypatch):
    p = make_onnx(tmp_path / "net.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(CheckpointError, match=r"net\.onnx: .*pip install modelatlas\[onnx\]"):
        open_checkpoint(p)


def make_low_precision_onnx(path):
    """bfloat16 and float8 initializers: numpy has no such dtypes (onnx returns ml_dtypes arrays)."""
    inits = [helper.make_tensor("bf", onnx.TensorProto.BFLOAT16, [2], [1.5, -2.0]),
             helper.make_tensor("f8", onnx.TensorProto.FLOAT8E4M3FN, [2], [0.5, 4.0])]
    onnx.save_model(helper.make_model(helper.make_graph([], "lp", [], [], initializer=inits)), str(path))
    return path


def test_bfloat16_and_float8_initializers(tmp_path):
    with open_checkpoint(make_low_precision_onnx(tmp_path / "lp.onnx")) as ck:
        assert [(t.name, t.dtype) for t in ck.tensors()] == [("bf", "bfloat16"), ("f8", "float8_e4m3fn")]
        bf, f8 = ck.read("bf"), ck.read("f8")
        assert bf.dtype == torch.bfloat16 and torch.equal(bf.float(), torch.tensor([1.5, -2.0]))
        assert f8.dtype == torch.float8_e4m3fn and torch.equal(f8.float(), torch.tensor([0.5, 4.0]))


def make_hub_snapshot(cache):
    """A Hugging Face cache layout: snapshots/<rev>/ holds symlinks into ../../blobs/ (hashes as names)."""
    blobs, snap = cache / "blobs", cache / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    make_onnx(blobs / "model.onnx", external=True)  # location "weights.data", renamed below like a blob
    (blobs / "model.onnx").rename(blobs / "1111")
    (blobs / "weights.data").rename(blobs / "2222")
    (snap / "net.onnx").symlink_to("../../blobs/1111")
    (snap / "weights.data").symlink_to("../../blobs/2222")
    return snap / "net.onnx"


def test_external_data_through_hub_cache_symlinks(tmp_path):
    with open_checkpoint(make_hub_snapshot(tmp_path / "models--org--net")) as ck:
        assert torch.equal(ck.read("W"), torch.from_numpy(W))
        assert torch.equal(ck.read("shape"), torch.tensor([3, 2]))


def set_location(path, location):
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))


@pytest.mark.parametrize("location", ["sub/../../secret.data", "ABS"])
def test_external_data_escaping_by_name_is_refused(tmp_path, location):
    (tmp_path / "sub").mkdir()
    p = make_onnx(tmp_path / "sub" / "net.onnx", external=True)
    (tmp_path / "secret.data").write_bytes(b"\x00" * 64)
    location = str(tmp_path / "secret.data") if location == "ABS" else location
    set_location(p, location)
    with pytest.raises(CheckpointError, match=r"initializer 'W': external data .* lies outside the model's folder"):
        open_checkpoint(p).read("W")


def test_external_data_in_a_subfolder_is_read(tmp_path):
    p = make_onnx(tmp_path / "net.onnx", external=True)
    (tmp_path / "w").mkdir()
    (tmp_path / "weights.data").rename(tmp_path / "w" / "weights.data")
    set_location(p, "w/weights.data")
    with open_checkpoint(p) as ck:
        assert torch.equal(ck.read("W"), torch.from_numpy(W))


def test_truncated_external_data(tmp_path):
    p = make_onnx(tmp_path / "net.onnx", external=True)
    data = tmp_path / "weights.data"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=r"initializer 'W': external data file 'weights.data' is truncated: "
                                              r"it needs bytes 0\.\.\d+ but has 10"):  # before: no sizes
        open_checkpoint(p).read("W")


def make_initializer_onnx(path, *inits):
    onnx.save_model(helper.make_model(helper.make_graph([], "g", [], [], initializer=list(inits))), str(path))
    return path


def test_bad_initializers_are_named_when_opened(tmp_path):
    bad_type = numpy_helper.from_array(W, "W")
    bad_type.data_type = 999  # ValueError traceback from the dtype lookup before
    negative = numpy_helper.from_array(W.reshape(6), "W")
    negative.ClearField("dims")
    negative.dims.extend([-1, 6])  # listed as shape (-1, 6), read as (1, 6) before
    for name, init, message in [("type.onnx", bad_type, "initializer 'W' has unknown data type 999"),
                                ("neg.onnx", negative, r"initializer 'W' has negative dimensions \[-1, 6\]")]:
        with pytest.raises(CheckpointError, match=rf"{name}: {message}"):
            open_checkpoint(make_initializer_onnx(tmp_path / name, init))
    huge = numpy_helper.from_array(W, "W")
    huge.ClearField("dims")
    huge.dims.extend([2**31] * 3)  # listed as such before: callers size buffers from listed shapes
    with pytest.raises(CheckpointError, match=r"huge\.onnx: initializer 'W': shape \[2147483648, 2147483648, "
                                              r"2147483648\] claims more values than its 24 bytes of data hold"):
        open_checkpoint(make_initializer_onnx(tmp_path / "huge.onnx", huge))
    (tmp_path / "empty.onnx").write_bytes(b"")  # parsed as a model with no tensors before
    with pytest.raises(CheckpointError, match=r"empty\.onnx: corrupt ONNX file: no graph"):
        open_checkpoint(tmp_path / "empty.onnx")


def test_string_and_sub_byte_initializers(tmp_path):
    """String initializers (labels) are not weights; 2/4-bit ints and float4/6 have no torch dtype (TypeError
    tracebacks before): they are read exactly in int8/uint8/float32, as listed."""
    p = make_initializer_onnx(tmp_path / "q.onnx", helper.make_tensor("labels", onnx.TensorProto.STRING, [2], [b"a", b"b"]),
                              helper.make_tensor("i4", onnx.TensorProto.INT4, [3], [-8, 0, 7]),
                              helper.make_tensor("f4", onnx.TensorProto.FLOAT4E2M1, [2], [0.5, -6.0]))
    with open_checkpoint(p) as ck:
        assert [(t.name, t.shape, t.dtype) for t in ck.tensors()] == [("i4", (3,), "int8"), ("f4", (2,), "float32")]
        assert torch.equal(ck.read("i4"), torch.tensor([-8, 0, 7], dtype=torch.int8))
        assert torch.equal(ck.read("f4"), torch.tensor([0.5, -6.0]))


def test_external_shape_the_file_cannot_hold_is_named_when_opened(tmp_path):
    p = make_onnx(tmp_path / "net.onnx", external=True)
    model = onnx.load(str(p), load_external_data=False)
    model.graph.initializer[0].ClearField("dims")
    model.graph.initializer[0].dims.extend([2**20, 2**20])
    del model.graph.initializer[0].external_data[1:]  # location only: "the rest of the file"
    onnx.save_model(model, str(p))
    with pytest.raises(CheckpointError, match=r"net\.onnx: initializer 'W': external data file 'weights.data' is "
                                              "truncated"):
        open_checkpoint(p)


def test_external_read_is_bounded_by_the_shape(tmp_path):
    p = make_onnx(tmp_path / "net.onnx", external=True)
    model = onnx.load(str(p), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = str(2**40)
    onnx.save_model(model, str(p))
    with pytest.raises(CheckpointError, match=r"net\.onnx: initializer 'W': external data length 1099511627776 does "
                                              r"not match its shape \[2, 3\] \(24 bytes\)"):
        open_checkpoint(p)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "length":  # no length: the shape's 24 bytes are read, not the rest of the file
            model.graph.initializer[0].external_data.remove(entry)
            break
    onnx.save_model(model, str(p))
    with open_checkpoint(p) as ck:
        assert torch.equal(ck.read("W"), torch.from_numpy(W))


def test_an_initializer_listed_twice_is_refused(tmp_path):
    # the ONNX checker refuses a name defined twice; the reader kept the last one, another tool the first
    model = onnx.load(str(make_onnx(tmp_path / "net.onnx")))
    model.graph.initializer.append(numpy_helper.from_array(W + 1, "W"))
    onnx.save_model(model, str(tmp_path / "net.onnx"))
    with pytest.raises(CheckpointError, match=r"net\.onnx: initializer 'W' is listed twice"):
        open_checkpoint(tmp_path / "net.onnx")


@pytest.mark.parametrize("external", [False, True])
def test_a_file_named_by_bytes_that_are_not_utf8_is_read(tmp_path, non_utf8_name, external):
    """The model and the folder its external data lies in (onnx itself writes neither under such a name)."""
    (tmp_path / "w").mkdir()
    make_onnx(tmp_path / "w" / "net.onnx", external)
    folder = (tmp_path / "w").rename(tmp_path / non_utf8_name)
    model = (folder / "net.onnx").rename(folder / f"{non_utf8_name}.onnx")
    with open_checkpoint(model) as ck:
        assert ck.name == non_utf8_name and torch.equal(ck.read("W"), torch.from_numpy(W))


def test_external_data_location_that_is_a_folder_is_named_so(tmp_path):
    p = make_onnx(tmp_path / "net.onnx", external=True)
    (tmp_path / "weights.data").unlink()
    (tmp_path / "weights.data").mkdir()  # before: "is missing", though it is there
    with pytest.raises(CheckpointError, match=r"external data file 'weights.data' is not a file"):
        open_checkpoint(p).read("W")


@pytest.mark.parametrize("old, new, message", [
    (b"weights.data", b"weights\xffdata", r"initializer 'W': external data location b'weights\\xffdata' is not UTF-8"),
    (b"B\x01W", b"B\x01\xff", r"initializer b'\\xff' has a name that is not UTF-8"),  # field 8: the name
])
def test_names_that_are_not_utf8_are_one_error(tmp_path, old, new, message):
    """protobuf gives a string field of bytes that are not UTF-8 as bytes: Path(location) raised TypeError (a
    traceback), and a bytes tensor name was listed among str names (sorting them failed later, in lineage)."""
    p = make_onnx(tmp_path / "net.onnx", external=True)
    p.write_bytes(p.read_bytes().replace(old, new))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(p)


def test_weights_stored_as_constant_nodes_are_tensors(tmp_path):
    """Some exporters store the weights as Constant nodes, not initializers: such a model listed no tensor,
    and lineage said 'no float matrix to compare'."""
    nodes = [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(W, "")),
             helper.make_node("Constant", [], ["alpha"], value_float=0.5),  # a scalar attribute: no tensor
             helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "consts", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 2])],
                              initializer=[numpy_helper.from_array(SHAPE, "shape")])
    onnx.save_model(helper.make_model(graph), str(tmp_path / "c.onnx"))
    with open_checkpoint(tmp_path / "c.onnx") as ck:
        assert [(t.name, t.shape, t.dtype) for t in ck.tensors()] == [("shape", (2,), "int64"), ("W", (2, 3), "float32")]
        assert torch.equal(ck.read("W"), torch.from_numpy(W))
    twice = helper.make_graph([helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(W, ""))],
                              "twice", [], [], initializer=[numpy_helper.from_array(SHAPE, "shape")])
    onnx.save_model(helper.make_model(twice), str(tmp_path / "twice.onnx"))
    with pytest.raises(CheckpointError, match="initializer 'shape' is listed twice"):
        open_checkpoint(tmp_path / "twice.onnx")
