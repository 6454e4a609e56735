import pickle
import re
import sys
import zipfile

import pytest
import torch
from tests.weights.conftest import check_reads_state_dict, make_evil, make_state_dict

from modelatlas.errors import CheckpointError, UnsafeCheckpointError
from modelatlas.weights import open_checkpoint


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_zip_state_dict(tmp_path, suffix):
    p = tmp_path / f"m{suffix}"
    torch.save(make_state_dict(), p)
    assert zipfile.is_zipfile(p)
    with open_checkpoint(p) as ck:
        assert ck.name == "m" and ck.format == "torch"
        check_reads_state_dict(ck)


def test_legacy_pickle(tmp_path):
    p = tmp_path / "old.pt"
    torch.save(make_state_dict(), p, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(p)
    with open_checkpoint(p) as ck:
        check_reads_state_dict(ck)


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_nested_state_dict(tmp_path, key):
    # pytorch/examples' ImageNet layout: "epoch" beside "state_dict" is no Lightning marker, names stay
    p = tmp_path / "run.ckpt"
    torch.save({"epoch": 3, "arch": "mlp", key: make_state_dict(), "optimizer": {"lr": 0.1}}, p)
    with open_checkpoint(p) as ck:
        check_reads_state_dict(ck)
        assert ck.name_prefix == ""


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, legacy):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": make_evil(marker)}, p, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: refused to unpickle.*(system|GLOBAL)"):
        open_checkpoint(p)
    assert not marker.exists()


def test_raw_pickle_with_reduce_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "raw.bin"
    p.write_bytes(pickle.dumps({"x": make_evil(marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"raw\.bin: refused"):
        open_checkpoint(p)
    assert not marker.exists()
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(make_evil(control), protocol=2))  # the payload is live: plain pickle runs it
    assert control.exists()


def test_pickled_module_is_refused(tmp_path):
    p = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), p)
    with pytest.raises(UnsafeCheckpointError, match=r"module\.pt: refused to unpickle") as e:
        open_checkpoint(p)
    msg = str(e.value)  # the class, and the fix a command-line user can follow (not torch's add_safe_globals)
    assert "torch.nn.modules.linear.Linear" in msg and "add_safe_globals" not in msg
    assert "torch.save(torch.load(PATH, weights_only=False).state_dict(), 'model.pt')" in msg


def test_truncated_garbage_empty(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(make_state_dict(), good)
    cases = {"trunc.pt": good.read_bytes()[:-100], "garbage.pth": b"\x80\x02garbage" * 10, "empty.bin": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{name}: corrupt") as info:
            open_checkpoint(tmp_path / name)
        assert not isinstance(info.value, UnsafeCheckpointError)
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"empty\.bin: corrupt or truncated PyTorch file: the file is empty"):
        open_checkpoint(tmp_path / "empty.bin")  # was "...: EOFError"
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:700])  # no zip directory: torch's reason, not its advice
    with pytest.raises(CheckpointError, match=r"cut\.pt: corrupt or truncated PyTorch file: PytorchStreamReader "
                                              r"failed reading zip archive: failed finding central directory\.$"):
        open_checkpoint(tmp_path / "cut.pt")  # (then ~300 characters: "This is an internal miniz error. If ...")


def test_not_a_state_dict(tmp_path):
    p = tmp_path / "t.pt"
    torch.save(torch.ones(3), p)
    with pytest.raises(CheckpointError, match=r"t\.pt: not a state dict"):
        open_checkpoint(p)
    torch.save({"epoch": 1}, p)
    with pytest.raises(CheckpointError, match=r"t\.pt: no tensors"):
        open_checkpoint(p)


def make_lying_zip(src, dst, keep_bytes):
    """Copy a torch zip, cutting the first storage record to ``keep_bytes`` while the pickle still claims all."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, data[:keep_bytes] if info.filename.endswith("/data/0") else data)
    return dst


def test_header_that_lies_about_sizes(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"a": torch.ones(100), "b": torch.arange(3), "e": torch.empty(0)}, good)
    with open_checkpoint(good) as ck:  # the check accepts honest files, empty tensors included
        assert torch.equal(ck.read("b"), torch.arange(3))
    lie = make_lying_zip(good, tmp_path / "lie.pt", keep_bytes=40)
    with pytest.raises(CheckpointError, match=r"lie\.pt: header lies about sizes: a tensor storage needs 400 "
                                              r"bytes but record '.*data/0' holds 40 bytes"):
        open_checkpoint(lie)


def test_shared_storage_views(tmp_path):
    base = torch.arange(12.0)
    p = tmp_path / "tied.pt"
    torch.save({"full": base, "view": base[4:8], "tied": base}, p)
    with open_checkpoint(p) as ck:
        assert torch.equal(ck.read("view"), torch.arange(4.0, 8.0))


@pytest.mark.parametrize("legacy", [False, True])
def test_caller_mutation_does_not_reach_later_reads(tmp_path, legacy):
    base = torch.arange(6.0)
    p = tmp_path / "m.pt"
    torch.save({"w": base, "tied": base[2:4]}, p, _use_new_zipfile_serialization=not legacy)
    with open_checkpoint(p) as ck:
        ck.read("w").add_(100.0)
        ck.read("tied").zero_()
        assert torch.equal(ck.read("w"), torch.arange(6.0))
        assert torch.equal(ck.read("tied"), torch.tensor([2.0, 3.0]))
    assert torch.equal(torch.load(p, weights_only=True)["w"], torch.arange(6.0))  # the file is untouched too


def make_training_saves(state):
    """The same weights as training scripts save them: plain, tutorial-style with optimizer state, DDP-wrapped,
    and both at once (a dict of tensors for Adam's moments, as ``optimizer.state_dict()`` gives)."""
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3), "exp_avg_sq": torch.ones(2, 3)}},
           "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    ddp = {f"module.{k}": v for k, v in state.items()}
    return {"plain": state, "tutorial": {"epoch": 3, "model_state_dict": state, "optimizer_state_dict": opt},
            "ddp": ddp, "ddp-tutorial": {"epoch": 3, "model_state_dict": ddp, "optimizer_state_dict": opt},
            "flat-with-optimizer": {**state, "optimizer": opt, "lr_scheduler": {"last_epoch": torch.tensor(3)}},
            "compiled": {f"_orig_mod.{k}": v for k, v in state.items()}}


def test_wrapped_training_saves_list_the_same_tensors_as_a_plain_save(tmp_path):
    for name, obj in make_training_saves(make_state_dict()).items():
        torch.save(obj, tmp_path / f"{name}.pt")
        with open_checkpoint(tmp_path / f"{name}.pt") as ck:
            check_reads_state_dict(ck)


def test_meta_tensors_are_named_as_holding_no_values(tmp_path):
    torch.save({"w": torch.empty(4, 4, device="meta"), "b": torch.ones(4)}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"m\.pt: holds tensors on the meta device \(shapes without values"):
        open_checkpoint(tmp_path / "m.pt")  # was "header lies about sizes: ... no record starts there"


@pytest.mark.parametrize("legacy", [False, True])
def test_sparse_tensors_are_one_error_not_a_traceback(tmp_path, legacy):
    """A pruned model saved with to_sparse(): the storage check raised torch's NotImplementedError, which no
    caller catches (a traceback, and lineage recover ended instead of skipping the model)."""
    w = torch.eye(4).to_sparse()
    torch.save({"w": w, "b": torch.ones(4)}, tmp_path / "s.pt", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match=r"s\.pt: holds a sparse tensor \(torch\.sparse_coo, shape \(4, 4\)\)"):
        open_checkpoint(tmp_path / "s.pt")


@pytest.mark.parametrize("record", [b"data.pkl", b"/version"])
def test_a_zip_record_name_that_is_not_utf8_is_one_error(tmp_path, record):
    """zipfile decodes a record name flagged UTF-8 and raised UnicodeDecodeError (a traceback; lineage recover
    ended) on a file whose name bytes were corrupted."""
    p = tmp_path / "z.pt"
    torch.save({"w": torch.ones(2)}, p)
    p.write_bytes(p.read_bytes().replace(record, record[:-4] + b"\xff" + record[-3:]))
    with pytest.raises(CheckpointError, match=r"z\.pt: corrupt PyTorch zip file: 'utf-8' codec can't decode"):
        open_checkpoint(p)


def make_zip_edit(data: bytes, signature: bytes, at: int, value: int) -> bytes:
    """``data`` with the byte ``at`` bytes after the first zip ``signature`` set to ``value``."""
    i = data.index(signature) + at
    return data[:i] + bytes([value]) + data[i + 1:]


@pytest.mark.parametrize("signature, at, message", [
    (b"PK\x06\x07", 16, "span multiple disks"),  # zip64 locator: 2 disks
    (b"PK\x01\x02", 6, "zip file version"),  # central directory: extract version 25.5
])
def test_zip_headers_zipfile_cannot_take_are_one_error(tmp_path, signature, at, message):
    """zipfile.is_zipfile let BadZipFile through, and a version over 6.3 raised NotImplementedError: tracebacks."""
    p = tmp_path / "z.pt"
    torch.save({"w": torch.ones(2)}, p)
    p.write_bytes(make_zip_edit(p.read_bytes(), signature, at, 2 if at == 16 else 255))
    with pytest.raises(CheckpointError, match=rf"z\.pt: corrupt PyTorch zip file: .*{message}"):
        open_checkpoint(p)


def test_two_tensors_flattened_to_one_name_are_refused(tmp_path):
    """{"a.b": x, "a": {"b": y}} flattens both to 'a.b': one of them was dropped without a word."""
    torch.save({"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"c\.pt: two tensors are named 'a\.b' once nested dicts are "
                                              "flattened"):
        open_checkpoint(tmp_path / "c.pt")


def test_an_optimizer_state_saved_alone_is_no_model(tmp_path):
    opt = make_training_saves(make_state_dict())["tutorial"]["optimizer_state_dict"]
    torch.save(opt, tmp_path / "optimizer.pt")  # as an HF Trainer checkpoint holds it: was a model "optimizer"
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: holds an optimizer's state \(keys 'state' and "
                                              r"'param_groups': e\.g\. Adam's moments\), not model weights"):
        open_checkpoint(tmp_path / "optimizer.pt")


def test_a_shared_prefix_that_is_not_a_wrapper_and_weights_named_like_state_are_kept(tmp_path):
    torch.save({"encoder.a": torch.ones(2), "encoder.scaler": torch.ones(2)}, tmp_path / "m.pt")
    torch.save({"scaler": {"weight": torch.ones(2)}, "optimizer.w": torch.ones(2)}, tmp_path / "n.pt")
    with open_checkpoint(tmp_path / "m.pt") as m, open_checkpoint(tmp_path / "n.pt") as n:
        assert m.keys() == ["encoder.a", "encoder.scaler"] and n.keys() == ["optimizer.w"]


def test_compressed_record_is_refused_before_it_is_unpacked(tmp_path):
    """A deflated data.pkl holding a huge string: torch would unpack it into memory whole (a zip bomb)."""
    torch.save({"w": torch.ones(2)}, tmp_path / "good.pt")
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(tmp_path / "good.pt") as zin, zipfile.ZipFile(bomb, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):  # PROTO 2, a 2 MB string, then the state dict
                data = b"\x80\x02X" + (2**21).to_bytes(4, "little") + b"A" * 2**21 + b"0" + data[2:]
            zout.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 2**16
    with pytest.raises(CheckpointError, match=r"bomb\.pt: zip record '.*data\.pkl' is compressed or claims "
                                              r"\d+ bytes for \d+ stored .*refused"):
        open_checkpoint(bomb)


@pytest.mark.parametrize("text", ["this is not a checkpoint\n" * 10, "hello\n", "a,b\n1,2\n" * 5])
def test_text_file_named_bin_is_no_pytorch_file_not_a_traceback(tmp_path, text):
    """The legacy unpickler raised IndexError or KeyError on it, read as "corrupt or truncated PyTorch file: 101"
    (the KeyError of the 'e' of "hello"): the file's first bytes say what it is."""
    p = tmp_path / "notes.bin"
    p.write_text(text)
    with pytest.raises(CheckpointError, match=rf"^{p}: not a PyTorch file: it begins with {re.escape(repr(text[:20].encode()))}, "
                                              r"neither a zip archive nor a pickle \(what torch\.save writes\)$"):
        open_checkpoint(p)


@pytest.mark.parametrize("shared", [False, True])
def test_deep_or_shared_nesting_is_refused(tmp_path, shared):
    """500 nested dicts (refused past 32 levels, before any recursive walk), or one dict listed twice at each
    of 21 levels (2 million flattened names from a 1 kB file). Not deeper: Python 3.12's pickler cannot
    write more than about 700 levels whatever sys.setrecursionlimit says (3.13's about 5,000)."""
    d = {"w": torch.ones(1)}
    for _ in range(21 if shared else 500):
        d = {"a": d, "b": d} if shared else {"a": d}
    p = tmp_path / "nested.pt"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)  # for torch.save's own (recursive) pickler only
    try:
        torch.save(d, p)
    finally:
        sys.setrecursionlimit(limit)
    what = "more than 2,000,000 entries" if shared else "containers nested more than 32 deep"
    with pytest.raises(CheckpointError, match=rf"nested\.pt: not a state dict: {what}"):
        open_checkpoint(p)
    torch.save({"model": {"enc": {"layers": {"0": {"weight": torch.ones(1)}}}}}, p)
    with open_checkpoint(p) as ck:
        assert ck.keys() == ["enc.layers.0.weight"]


def test_protocol_4_pickle_is_one_error_without_warnings(tmp_path, recwarn):
    p = tmp_path / "p4.pt"
    p.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4))  # torch's unpickler warned about the protocol on stderr
    with pytest.raises(CheckpointError, match=r"p4\.pt: corrupt or unsupported PyTorch pickle"):
        open_checkpoint(p)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_parameters_are_read_as_plain_tensors(tmp_path):
    # torch.save(dict(model.named_parameters())) stores nn.Parameters: a read was a tensor that requires grad,
    # unlike every other reader's (its .numpy() failed, and math on it recorded an autograd graph)
    torch.save({"w": torch.nn.Parameter(torch.ones(2, 2))}, tmp_path / "p.pt")
    with open_checkpoint(tmp_path / "p.pt") as ck:
        w = ck.read("w")
    assert type(w) is torch.Tensor and not w.requires_grad
    assert w.numpy().sum() == 4


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_file_named_by_bytes_that_are_not_utf8_is_read(tmp_path, non_utf8_name, zip_format):
    """torch maps a zip file by a UTF-8 name (``UntypedStorage.from_file``): such a model was "corrupt"."""
    p = tmp_path / f"{non_utf8_name}.pt"
    torch.save(make_state_dict(), p, _use_new_zipfile_serialization=zip_format)
    with open_checkpoint(p) as ck:
        assert ck.name == non_utf8_name
        check_reads_state_dict(ck)


def test_a_view_claiming_far_more_than_its_storage_is_refused_before_a_read_allocates_it(tmp_path):
    """A stride-0 view of 10^12 elements over one stored value (fuzz case: torch.save of ones(1).expand(10**12))
    was listed, then each read's copy asked for 4 TB ("cannot read tensor 'w': ... can't allocate memory")."""
    torch.save({"w": torch.ones(1).expand(10**12), "b": torch.ones(2)}, tmp_path / "lie.pt")
    with pytest.raises(CheckpointError, match=r"lie\.pt: header lies about sizes: tensor 'w' of shape "
                                              r"\(1000000000000,\) claims 4000000000000 bytes over 4 stored"):
        open_checkpoint(tmp_path / "lie.pt")
    ids = torch.arange(512).expand(1, -1)  # transformers' position_ids buffer: an expanded view, read as saved
    torch.save({"position_ids": ids, "w": torch.ones(3).expand(4, 3)}, tmp_path / "ok.pt")
    with open_checkpoint(tmp_path / "ok.pt") as ck:
        assert torch.equal(ck.read("position_ids"), ids) and torch.equal(ck.read("w"), torch.ones(4, 3))


def make_legacy_lie(src, dst, which: str, value: int):
    """A copy of legacy (not zip) file ``src`` whose first tensor's storage element count (``which="count"``, in
    its persistent id) or first dimension (``"size"``, in its rebuild's arguments) is ``value`` (an 8-byte LONG1)."""
    import io
    import pickletools

    data = src.read_bytes()
    f = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info
        list(pickletools.genops(f))
    ops = list(pickletools.genops(f))
    after = "cpu" if which == "count" else None  # the location, then the count; the persistent id, offset, size
    first = next(i for i, (op, arg, _) in enumerate(ops) if (arg == after if after else op.name == "BINPERSID"))
    at = [pos for op, _, pos in ops[first:] if op.name == "BININT1"][0 if which == "count" else 1]
    dst.write_bytes(data[:at] + b"\x8a\x08" + value.to_bytes(8, "little") + data[at + 2:])
    return dst


@pytest.mark.parametrize(("which", "value", "message"), [
    ("count", 10**9, r"a FloatStorage of 1000000000 elements needs 4000000000 bytes, more than the whole file's \d+"),
    ("count", 10**12, r"a FloatStorage of 1000000000000 elements needs 4000000000000 bytes"),
    ("size", 2**31 - 1, r"a tensor of shape \(2147483647, 3\), stride \(3, 1\) at offset 0 reaches element "
                        r"6442450940 of a FloatStorage of 6")])
def test_a_legacy_file_claiming_more_than_it_holds_is_refused_before_torch_allocates_it(tmp_path, which, value,
                                                                                         message):
    """torch's legacy loader allocates each storage at the count its pickle states, then compares the file's bytes,
    and grows a storage to fit a tensor's size: 10^12 floats asked for 4 TB ("can't allocate memory"), 10^9
    reserved 4 GB, a first dimension of 2^31 - 1 asked for 24 GB, before the file was found corrupt (fuzz cases:
    a count or a size of the pickle made to lie)."""
    src = tmp_path / "ok.pt"
    torch.save(make_state_dict(), src, _use_new_zipfile_serialization=False)
    with open_checkpoint(src) as ck:
        check_reads_state_dict(ck)
    lie = make_legacy_lie(src, tmp_path / "lie.pt", which, value)
    with pytest.raises(CheckpointError, match=rf"lie\.pt: header lies about sizes: {message}"):
        open_checkpoint(lie)
