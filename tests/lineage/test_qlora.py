"""Merged QLoRA models recognised from their values (lineage.qlora): detection, the rounding variance read off
them, the pair noise of two merges, and lineage with a merge standing in for its model."""

import numpy as np
import pytest
import torch
from tests.weights.conftest import make_mxfp4, make_nvfp4

import modelatlas.lineage.recover as R
from modelatlas.lineage import recover_lineage
from modelatlas.lineage.qlora import (
    KIND,
    MERGE_POSITION,
    detect,
    fp4_position,
    mark_merges,
    merge_position,
    nf4_block,
)
from modelatlas.lineage.rounding import LayerRounding
from modelatlas.lineage.sources import MemoryCheckpoint
from modelatlas.weights import TensorInfo, open_checkpoint
from modelatlas.weights import bnb as B
from modelatlas.zoo.awq import save_folder as make_model


def nf4(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``w`` rounded to bitsandbytes' NF4 (per ``block`` flattened values: absmax x nearest book value) and
    dequantized, as a QLoRA base is before its update is merged."""
    flat = w.reshape(-1).float()
    scale = flat.view(-1, block).abs().amax(1).repeat_interleave(block)
    return (B.NF4[B.requantize_4bit(flat, B.NF4, block).long()] * scale).reshape(w.shape)


def merged(w: torch.Tensor, rel: float, seed: int = 1, block: int = 64, dtype=torch.bfloat16) -> torch.Tensor:
    """NF4(w) plus an update ``rel`` of ``w``'s RMS, saved as ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (nf4(w, block) + rel * w.pow(2).mean().sqrt() * torch.randn(w.shape, generator=g)).to(dtype)


@pytest.fixture
def w():
    return torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rel", [1e-4, 1e-3, 1e-2])
def test_merge_sits_on_the_nf4_levels(w, rel, dtype):
    assert merge_position(merged(w, rel, dtype=dtype), 64) < 0.12  # measured 0.001-0.08


def test_ordinary_and_random_models_sit_anywhere(w):
    uniform = torch.rand(64, 256, generator=torch.Generator().manual_seed(3)) - 0.5
    for x in (w.to(torch.bfloat16), uniform):
        assert abs(merge_position(x, 64) - 0.5) < 0.03
        assert nf4_block(x)[1] > MERGE_POSITION


def test_a_pruned_model_is_no_merge(w):
    """Half its weights exactly 0 (magnitude pruning): zeros sit on NF4's 0 level, and it read 0.25."""
    pruned = torch.where(w.abs() < w.abs().median(), torch.zeros_like(w), w).to(torch.bfloat16)
    assert nf4_block(pruned)[1] > MERGE_POSITION


def test_block_size_found(w):
    assert nf4_block(merged(w, 1e-3, block=128))[0] == 128
    assert nf4_block(merged(w, 1e-3))[0] == 64


def test_detect_only_the_merge(w):
    layers = [TensorInfo("a.weight", (64, 256), "bfloat16"), TensorInfo("a.bias", (64,), "bfloat16")]
    merge = MemoryCheckpoint("m", {"a.weight": merged(w, 1e-2), "a.bias": torch.zeros(64)})
    plain = MemoryCheckpoint("p", {"a.weight": w.to(torch.bfloat16), "a.bias": torch.zeros(64)})
    assert detect(merge, layers) == 64 and detect(plain, layers) is None
    out, found = mark_merges([plain, merge], layers)
    assert found == ["m"] and out[0] is plain
    assert out[1].quantization("a.weight") == KIND and out[1].quantization("a.bias") is None
    assert out[1].rounding_variance("a.bias") is None


def test_variance_is_the_real_rounding_error(w):
    m = merged(w, 1e-3)
    v = B.merged_variance_4bit(m, B.NF4, 64)
    real = float((nf4(w) - w).square().mean())
    assert float(v.mean()) == pytest.approx(real, rel=0.05)  # measured within ~2 %
    # a block with one value on an end level: it is the block's absmax, exact
    flat, vb = m.reshape(-1, 64).float(), v.reshape(-1, 64)
    ends = (flat.abs() / flat.abs().amax(1, keepdim=True)) > (0.7229568362236023 + 1) / 2  # rounds to +-1
    one = ends.sum(1) == 1
    assert one.sum() > 10 and torch.all(vb[one][ends[one]] == 0)


def test_variance_hand_checked():
    # two values on the end levels +-1 of a block of 4: one of them is its absmax, exact, so each holds
    # (k - 1) / k = 1 / 2 of the end level's variance; alone on an end, the absmax holds none
    two = B.merged_variance_4bit(torch.tensor([[1.0, -1.0, 0.0, 0.5]]), B.NF4, 4)
    one = B.merged_variance_4bit(torch.tensor([[1.0, -0.1, 0.0, 0.5]]), B.NF4, 4)
    assert two[0, 0] > 0 and two[0, 1] > 0 and one[0, 0] == 0
    assert 0 < two[0, 2] <= (0.07958029955625534 + 0.09105003625154495) ** 2 / 4  # within half a gap each side


def test_two_merges_share_their_rounding():
    layer = LayerRounding(np.array([1.0, 1.0, 0.0]), np.array([KIND, KIND, None], dtype=object), 100)
    a, b = np.array([0, 0]), np.array([1, 2])
    noise = layer.pair_noise(a, b, np.array([0.5, 5.0]))
    assert noise[0] == 0.0  # one and the same error: nothing of it in their difference
    assert noise[1] == 1.0  # against a float model: the merge's own


def _tree():
    """A tree of 2-layer models: base -> a -> (a1, a2), each update 4 % of the weights' RMS (a's NF4 rounding:
    ~9 %); and a's QLoRA-style merge: NF4(base) plus a's update."""
    g = torch.Generator().manual_seed(7)

    def step(m, rel):
        return {k: v + rel * v.pow(2).mean().sqrt() * torch.randn(v.shape, generator=g) for k, v in m.items()}

    base = {k: torch.randn(64, 256, generator=g) * 0.02 for k in ("l0.weight", "l1.weight")}
    a = step(base, 0.04)
    models = {"base": base, "a": a, "a1": step(a, 0.04), "a2": step(a, 0.04)}
    return models, {k: nf4(v) + (a[k] - base[k]) for k, v in base.items()}


def _pairs(forest):
    return {frozenset((p, c)) for c, p in forest.parents().items() if p is not None}


def test_lineage_with_a_merge_standing_in(monkeypatch):
    models, merge = _tree()
    models["a"] = {k: v.to(torch.bfloat16) for k, v in merge.items()}
    want = {frozenset(e) for e in (("base", "a"), ("a", "a1"), ("a", "a2"))}
    forest = recover_lineage(models)
    assert forest.decisions["nf4_merges"] == ["a"]
    assert _pairs(forest) == want
    monkeypatch.setattr(R, "mark_merges", lambda m, _l: (m, []))
    assert _pairs(recover_lineage(models)) != want  # its NF4 rounding left in: a apart from its kin


def test_lineage_of_float_models_unchanged():
    models, _ = _tree()
    assert "nf4_merges" not in recover_lineage(models).decisions


def test_cli_notes_the_merge(tmp_path, capsys):
    from safetensors.torch import save_file

    from modelatlas.cli.main import main

    models, merge = _tree()
    models["a"] = {k: v.to(torch.bfloat16) for k, v in merge.items()}
    for name, tensors in models.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / f"{name}.safetensors"))
    assert main(["lineage", "recover", *sorted(str(p) for p in tmp_path.glob("*.safetensors"))]) == 0
    err = capsys.readouterr().err
    assert "a: its values sit on the NF4 levels" in err and "base: its values" not in err


def test_a_float32_model_is_not_read_again():
    """A merge is saved in half precision: a float32 model's matrices are not read for the test (it took the
    held-out zoos' recovery ~2x as long), even where they would sit on NF4's levels."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    ck = MemoryCheckpoint("m32", {"a.weight": merged(w, 1e-3).float()})
    reads = []
    ck._read = lambda name, read=ck._read: reads.append(name) or read(name)
    assert detect(ck, ck.tensors()) is None and reads == []


def test_a_merge_view_takes_the_values_read_without_reading_again(w):
    """The pass hands each layer's float32 row to rounding_variance: the same variance as reading the bfloat16
    layer again, and no second read."""
    layers = [TensorInfo("a.weight", (64, 256), "bfloat16")]
    merge = MemoryCheckpoint("m", {"a.weight": merged(w, 1e-2)})
    view = mark_merges([merge], layers)[0][0]
    reads = []
    merge._read = lambda name, read=merge._read: reads.append(name) or read(name)
    again = view.rounding_variance("a.weight")
    assert reads == ["a.weight"]
    row = merge.read("a.weight").reshape(1, -1).float()  # (1, P) as lineage.distances reads it
    reads.clear()
    assert torch.equal(view.rounding_variance("a.weight", row), again) and reads == []


def make_fp4_merge(tmp_path, w: torch.Tensor, make, rel: float) -> torch.Tensor:
    """``w`` written as FP4 by ``make`` (tests/weights' make_nvfp4 / make_mxfp4), read back dequantized, plus
    an update ``rel`` of ``w``'s RMS, in bfloat16: a lone model merged from an FP4 base."""
    with open_checkpoint(make_model(tmp_path / make.__name__, make(w, "a"))) as ck:
        base = ck.read("a.weight").float()
    g = torch.Generator().manual_seed(3)
    return (base + rel * w.pow(2).mean().sqrt() * torch.randn(w.shape, generator=g)).to(torch.bfloat16)


@pytest.mark.parametrize("make", [make_nvfp4, make_mxfp4])
@pytest.mark.parametrize("rel", [1e-3, 1e-2])
def test_an_fp4_merge_is_not_taken_for_an_nf4_one(tmp_path, w, make, rel):
    """A model made from a dequantized NVFP4 / MXFP4 base read 0.39-0.43 on NF4's levels (below MERGE_POSITION)
    and was wrapped as an NF4 merge with NF4's variance; on the E2M1 levels times its block scales it reads
    0.003-0.08, and it is left as it is. An NF4 merge still is one: it reads >= 0.37 on the FP4 levels."""
    layers = [TensorInfo("a.weight", (64, 256), "bfloat16")]
    x = make_fp4_merge(tmp_path, w, make, rel)
    assert min(fp4_position(x, "NVFP4"), fp4_position(x, "MXFP4")) < 0.1 < MERGE_POSITION < 0.5
    assert nf4_block(x)[1] < MERGE_POSITION  # what made it pass for NF4
    assert detect(MemoryCheckpoint("m", {"a.weight": x}), layers) is None
    nf4_merge = merged(w, rel)
    assert min(fp4_position(nf4_merge, "NVFP4"), fp4_position(nf4_merge, "MXFP4")) > 0.35
    assert detect(MemoryCheckpoint("n", {"a.weight": nf4_merge}), layers) == 64


def test_over_http_the_layers_the_merge_test_read_are_not_fetched_again(tmp_path):
    """The merge test reads up to 4 matrices of each half-precision model before the distances' pass reads every
    compared one: over HTTP those 4 were fetched twice (25 % more bytes and requests on the session-35 bench)."""
    from safetensors.torch import save_file
    from tests.weights.http_server import make_server

    from modelatlas.lineage.synthetic import make_synthetic_forest

    names = tuple(f"l{i}.q" for i in range(8))  # 8 compared matrices: the test reads every other one
    weights, _ = make_synthetic_forest(n_trees=1, children=2, depth=1, seed=5, layers=names)
    files = []
    for model, tensors in weights.items():
        files.append(tmp_path / f"{model}.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(files[-1]))
    local = recover_lineage(files)
    with make_server(tmp_path) as srv:
        remote = recover_lineage([srv.url(f.name) for f in files])
    header = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)
    assert srv.served == header + len(files) * 8 * 32 * 32 * 2  # each bfloat16 matrix once
    assert len(srv.seen) == len(files) * (2 + 8)  # 2 to open, 1 a matrix
    assert remote.to_dict() == local.to_dict()
