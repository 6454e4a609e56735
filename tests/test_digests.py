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
