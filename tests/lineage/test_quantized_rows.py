"""What the copy test (lineage.quantized) reads of a source: only the rows the quantized copy compares."""

import pytest
import torch
from safetensors.torch import save_file
from tests.weights.conftest import make_byte_counter, make_gguf_file, make_gpt_oss, make_nvfp4

from modelatlas.lineage.quantized import MIN_MATCH, copy_score, made_from_copy
from modelatlas.weights import open_checkpoint
from modelatlas.zoo.awq import save_folder

gguf = pytest.importorskip("gguf")


def make_copy(folder, rows=600):
    """A float32 model of two (rows, 64) layers and a bfloat16 one of the same values, as safetensors files,
    and the float32 one's Q8_0 GGUF copy."""
    gen = torch.Generator().manual_seed(0)
    w = {k: torch.randn(rows, 64, generator=gen).to(torch.bfloat16).float() for k in ("a.weight", "b.weight")}
    save_file(w, str(folder / "src.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in w.items()}, str(folder / "bf16.safetensors"))
    kind = gguf.GGMLQuantizationType.Q8_0
    make_gguf_file(folder / "copy.gguf", {k: (gguf.quants.quantize(v.numpy(), kind), "Q8_0") for k, v in w.items()})
    return [folder / n for n in ("src.safetensors", "bf16.safetensors", "copy.gguf")]


@pytest.mark.parametrize("source, width", [("src.safetensors", 64 * 4), ("bf16.safetensors", 64 * 2)])
def test_the_copy_test_reads_only_the_sampled_rows_of_a_source(tmp_path, monkeypatch, source, width):
    make_copy(tmp_path)
    with open_checkpoint(tmp_path / source) as src, open_checkpoint(tmp_path / "copy.gguf") as copy:
        got = make_byte_counter(monkeypatch)
        assert copy_score(copy, src) == pytest.approx(1 - MIN_MATCH)  # every value matches: a copy
        assert got[source] == 2 * 256 * width  # 256 of 600 rows of both layers (all 600 before)
        got.clear()
        assert not made_from_copy(copy, src, src.tensors())
        assert got[source] == 2 * 256 * width


def test_a_model_whose_layer_has_fewer_rows_is_refused_as_before(tmp_path):
    """A model's layer of 300 rows against a copy's of 600: no test (grid_position None), not an IndexError
    for the copy's sampled rows past its end."""
    make_copy(tmp_path)
    save_file({"a.weight": torch.zeros(300, 64), "b.weight": torch.zeros(300, 64)}, str(tmp_path / "short.safetensors"))
    with open_checkpoint(tmp_path / "short.safetensors") as short, open_checkpoint(tmp_path / "copy.gguf") as copy:
        assert not made_from_copy(copy, short, copy.tensors())
        assert copy_score(copy, short) == -1.0  # no matrix shared


@pytest.mark.parametrize("kind", ["nvfp4", "gpt-oss"])
def test_an_fp4_copy_reads_only_the_sampled_rows_of_a_source(tmp_path, monkeypatch, kind):
    """An FP4 copy's test reads 256 rows of each of a float32 source's layers (all 600 or 960 before), and so
    does its grid position: an NVFP4 matrix's own rows, or rows of gpt-oss's (experts * in, out) experts as read
    (their codes gathered from the transposed stored layout). A copy either way; the source is no merge of it."""
    gen = torch.Generator().manual_seed(0)
    shape = (3, 320, 64) if kind == "gpt-oss" else (600, 64)
    w = {k: torch.randn(shape, generator=gen) for k in ("a.weight", "b.weight")}
    save_file(w, str(tmp_path / "src.safetensors"))
    write = (lambda x, k: make_gpt_oss(x, k + ".weight")) if kind == "gpt-oss" else make_nvfp4
    save_folder(tmp_path / "copy", {n: v for k, x in w.items() for n, v in write(x, k.removesuffix(".weight")).items()})
    with open_checkpoint(tmp_path / "src.safetensors") as src, open_checkpoint(tmp_path / "copy") as copy:
        layers = [t for t in copy.tensors() if copy.quantization(t.name)]
        got = make_byte_counter(monkeypatch)
        assert copy_score(copy, src) >= 0  # a copy (the helper breaks a tie or two its own way)
        assert got["src.safetensors"] == 2 * 256 * 64 * 4
        got.clear()
        assert not made_from_copy(copy, src, layers)
        assert got["src.safetensors"] == 2 * 256 * 64 * 4
