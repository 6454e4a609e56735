"""data_digest: the SHA-256 recorded beside resumable state (attribute's checkpoint): its value must not change
between versions, or a kept state would be refused as 'data was ..., now ...' on resume."""

import hashlib
import struct

import torch

from modelatlas.digests import data_digest


def make_expected(*parts: tuple[tuple[int, ...], list[float]]) -> str:
    """The digest built by hand: each tensor's shape as repr, then its values as little-endian float32."""
    h = hashlib.sha256()
    for shape, values in parts:
        h.update(repr(shape).encode())
        h.update(struct.pack(f"<{len(values)}f", *values))
    return h.hexdigest()[:16]


def test_the_digest_is_the_sha256_of_shapes_and_float32_values():
    x, y = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0, 1])
    assert data_digest(x, y) == make_expected(((2, 2), [1, 2, 3, 4]), ((2,), [0, 1])) == "c3f4d820f5772ae5"


def test_other_dtypes_and_layouts_hash_as_their_float32_contiguous_values():
    x = torch.tensor([[1.0, 3.0], [2.0, 4.0]], dtype=torch.float64).T  # not contiguous, float64
    assert data_digest(x, torch.tensor([0, 1])) == "c3f4d820f5772ae5"
    assert data_digest(x, torch.tensor([1, 0])) != "c3f4d820f5772ae5"


def test_files_sha256_refuses_a_changed_file_and_a_record_of_another_type(tmp_path):
    import pytest

    from modelatlas.digests import check_files_sha256, files_sha256
    from modelatlas.errors import CheckpointError

    (tmp_path / "a.bin").write_bytes(b"abc")
    recorded = files_sha256(tmp_path, ["a.bin"])
    assert recorded == {"a.bin": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}  # SHA-256("abc")
    check_files_sha256(tmp_path, recorded, tmp_path / "index.json", "fix")
    check_files_sha256(tmp_path, None, tmp_path / "index.json", "fix")  # an index of before digests
    (tmp_path / "a.bin").write_bytes(b"abd")
    with pytest.raises(CheckpointError, match=r"a\.bin: is not the file index\.json records .*; fix$"):
        check_files_sha256(tmp_path, recorded, tmp_path / "index.json", "fix")
    with pytest.raises(CheckpointError, match=r"index\.json: files_sha256 must be an object of file -> SHA-256"):
        check_files_sha256(tmp_path, ["a.bin"], tmp_path / "index.json", "fix")
    for name in ("x" * 300, "../a.bin", "b.bin"):  # a name too long was an OSError naming it, not the index
        with pytest.raises(CheckpointError, match=r"index\.json: files_sha256 names '.*no file of "):
            check_files_sha256(tmp_path, {name: "0" * 64}, tmp_path / "index.json", "fix")
