import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.quantized import copy_score
from modelatlas.weights import open_checkpoint

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def make_weights(seed, base=None, step=0.0):
    """Three 64 x 64 layers: fresh (``base`` None) or ``base`` plus a relative change of ``step``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k in ("a.weight", "b.weight", "c.weight"):
        noise = torch.randn(64, 64, generator=gen)
        out[k] = noise if base is None else base[k] + step * noise * base[k].std()
    return out


def make_family(folder, n):
    """A model p and ``n`` fine-tunes of it 5 % away, saved as ``folder``/{p, ft0, ...}.safetensors."""
    p = make_weights(0)
    kids = {f"ft{i}": make_weights(10 + i, p, step=0.05) for i in range(n)}
    for name, w in {"p": p, **kids}.items():
        save_file(w, str(folder / f"{name}.safetensors"))
    return p, kids


def make_gguf(path, weights, kind=Q.Q8_0, plain=()):
    """``weights`` written to a GGUF file, quantized to ``kind`` (the layers in ``plain`` as float16, 1-D
    tensors as float32, as llama.cpp keeps them)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for name, t in weights.items():
        x = t.numpy()
        if x.ndim == 1:
            w.add_tensor(name, x.astype(np.float32))
            continue
        if name in plain:
            w.add_tensor(name, x.astype(np.float16))
            continue
        q = gguf.quants.quantize(x, kind)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_requantized_match_tells_a_copy_from_a_quantized_fine_tune(tmp_path):
    p = make_weights(0)
    f = make_weights(1, p, step=0.005)  # a fine-tune 0.5 % away: inside one Q8_0 step for most values
    with open_checkpoint(make_gguf(tmp_path / "p.gguf", p)) as ck:
        assert ck.quantization("a.weight") == "Q8_0"
        assert ck.requantized_match("a.weight", p["a.weight"]) == 1.0
        assert ck.requantized_match("a.weight", f["a.weight"]) < 0.9
        assert ck.requantized_match("a.weight", p["a.weight"], max_rows=5) == 1.0  # 5 rows of 64 decide too
        assert ck.requantized_match("a.weight", f["a.weight"], max_rows=5) < 0.9
    half = {k: v.half().float() for k, v in p.items()}  # llama.cpp's tools quantize an F16 conversion
    with open_checkpoint(make_gguf(tmp_path / "p16.gguf", half)) as ck:
        assert ck.requantized_match("a.weight", p["a.weight"]) == 1.0
    with open_checkpoint(make_gguf(tmp_path / "h.gguf", p, plain=("a.weight",))) as ck:
        assert ck.quantization("a.weight") is None and ck.requantized_match("a.weight", p["a.weight"]) is None


def test_plain_layers_of_a_copy_must_equal_the_source_rounded(tmp_path):
    p = make_weights(0)
    f = make_weights(1, p, step=0.005)
    save_file(p, str(tmp_path / "p.safetensors"))
    save_file(f, str(tmp_path / "f.safetensors"))
    copy = open_checkpoint(make_gguf(tmp_path / "c.gguf", p, plain=("b.weight",)))
    assert copy_score(copy, open_checkpoint(tmp_path / "p.safetensors")) >= 0  # a copy
    assert copy_score(copy, open_checkpoint(tmp_path / "f.safetensors")) < 0


def test_recovery_marks_quantized_copies_and_keeps_fine_tunes(tmp_path):
    p, kids = make_family(tmp_path, 3)
    make_gguf(tmp_path / "p-q8.gguf", p)
    make_gguf(tmp_path / "p-q4.gguf", p, Q.Q4_0)
    make_gguf(tmp_path / "ft1-q8.gguf", kids["ft1"])
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    copies = {(e.parent, e.child) for e in forest.edges if e.kind == "precision"}
    assert copies == {("p", "p-q8"), ("p", "p-q4"), ("ft1", "ft1-q8")}
    assert forest.decisions["precision_copies"] == {"p-q8": "q8_0", "p-q4": "q4_0", "ft1-q8": "q8_0"}
    assert {(e.parent, e.child) for e in forest.edges if e.kind == "trained"} == {("p", k) for k in kids}


def test_cli_names_the_copies_formats(tmp_path, capsys):
    from modelatlas.cli.main import main

    p = make_weights(0)
    for i in range(2):
        save_file(make_weights(10 + i, p, step=0.05), str(tmp_path / f"ft{i}.safetensors"))
    save_file(p, str(tmp_path / "p.safetensors"))
    make_gguf(tmp_path / "p-q8.gguf", p)
    assert main(["lineage", "recover", str(tmp_path), "--stage", "specialize"]) == 0
    out = capsys.readouterr().out
    assert "└── p-q8  (q8_0 copy of p)" in out or "├── p-q8  (q8_0 copy of p)" in out  # drawn by its format
    assert "1 a lower-precision copy of another (q8_0)" in out


def test_recovery_finds_a_k_quant_copy_on_its_grid(tmp_path):
    """Q4_K / Q6_K cannot be quantized again here (llama.cpp searches for their scales); a copy is told by
    every stored value being the grid level nearest to the source's."""
    from tests.weights.test_gguf_grid import make_k_rows

    from modelatlas.weights.gguf_grid import grid

    rng, _ = np.random.default_rng(3), torch.manual_seed(0)
    p, copy = {}, gguf.GGUFWriter(str(tmp_path / "p-k.gguf"), "llama")
    for i, (name, kind) in enumerate([("a.weight", "Q4_K"), ("b.weight", "Q6_K")]):
        raw, values = make_k_rows(kind, rows=16, blocks=1, seed=i)
        lo, step = grid(kind, Q[kind], raw, gguf.GGML_QUANT_SIZES[Q[kind]][1])
        p[name] = torch.from_numpy((values + rng.uniform(-0.4, 0.4, values.shape) * step).astype(np.float32))
        copy.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=Q[kind])
    copy.write_header_to_file()
    copy.write_kv_data_to_file()
    copy.write_tensors_to_file()
    copy.close()
    save_file(p, str(tmp_path / "p.safetensors"))
    for i in range(3):
        save_file({k: v + 0.05 * v.std() * torch.randn(v.shape) for k, v in p.items()}, str(tmp_path / f"ft{i}.safetensors"))
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    assert forest.decisions["precision_copies"] == {"p-k": "q4_k+q6_k"}
    assert {(e.parent, e.child) for e in forest.edges if e.kind == "precision"} == {("p", "p-k")}


def test_two_identical_quantized_files_are_both_copies_of_the_source(tmp_path):
    p, kids = make_family(tmp_path, 2)
    make_gguf(tmp_path / "p-q8.gguf", p)
    make_gguf(tmp_path / "same-q8.gguf", p)  # the same file under a second name: an identical copy of p-q8
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")  # was a KeyError
    assert {(e.parent, e.child) for e in forest.edges if e.kind == "precision"} == {("p", "p-q8"), ("p", "same-q8")}
    assert forest.decisions["precision_copies"] == {"p-q8": "q8_0", "same-q8": "q8_0"}
    assert set(forest.nodes) == {"p", "ft0", "ft1", "p-q8", "same-q8"}


def test_a_k_quant_fine_tune_missing_few_grid_values_is_not_a_copy(tmp_path):
    """A K-quant copy has every value on its source's grid (llama.cpp's Q2_K of a 0.1 % fine-tune of the
    blocks, head and embedding untouched, reads 99.93 %: it passed the 99.9 % bar and was called a copy)."""
    from tests.weights.test_gguf_grid import make_k_rows

    from modelatlas.weights.gguf_grid import grid

    kind = "Q2_K"
    raw, values = make_k_rows(kind, rows=64, blocks=4, seed=0)
    lo, step = grid(kind, Q[kind], raw, gguf.GGML_QUANT_SIZES[Q[kind]][1])
    rng = np.random.default_rng(1)
    source = values + rng.uniform(-0.4, 0.4, values.shape) * step
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    w.add_tensor("a.weight", raw, raw_shape=raw.shape, raw_dtype=Q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    codes = np.rint((values - lo) / np.where(step == 0, 1, step))
    moved = rng.choice(values.size, values.size // 2000, replace=False)  # 0.05 % of the values: one level on
    tuned = source.copy()
    tuned.flat[moved] += np.where(codes.flat[moved] < 3, 1, -1) * step.flat[moved]
    for name, x in (("p", source), ("f", tuned)):
        save_file({"a.weight": torch.from_numpy(x.astype(np.float32))}, str(tmp_path / f"{name}.safetensors"))
    copy = open_checkpoint(tmp_path / "q.gguf")
    assert copy_score(copy, open_checkpoint(tmp_path / "p.safetensors")) >= 0
    assert 0.999 < copy.requantized_match("a.weight", torch.from_numpy(tuned.astype(np.float32))) < 1.0
    assert copy_score(copy, open_checkpoint(tmp_path / "f.safetensors")) < 0


def make_iq4_gguf(path):
    """A GGUF file with one IQ4_NL tensor "a.weight" of 64 rows of 64 random codes (scale 0.01); its raw rows."""
    raw = np.random.default_rng(0).integers(0, 256, (64, 2, 18), dtype=np.uint8)  # 64 rows of 2 blocks
    raw[:, :, 0:2] = np.full((64, 2), 0.01, np.float16).view(np.uint8).reshape(64, 2, 2)
    raw = raw.reshape(64, -1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("a.weight", raw, raw_shape=raw.shape, raw_dtype=Q.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


def test_a_cast_that_leaves_the_source_unchanged_is_not_tested_again(tmp_path, monkeypatch):
    """A float16 source read as float32 or rounded to float16 is the same: IQ4 layers (16 dequantizations
    each, never a 100 % match that stops the casts early) were tested three times, two of them alike."""
    from modelatlas.weights.gguf_format import GGUFCheckpoint

    raw = make_iq4_gguf(tmp_path / "q.gguf")
    source = torch.from_numpy(gguf.quants.dequantize(raw, Q.IQ4_NL)).half()
    calls = []
    real = GGUFCheckpoint._value_test

    def counted(self, *a):
        test = real(self, *a)
        return lambda x: calls.append(1) or test(x)

    monkeypatch.setattr(GGUFCheckpoint, "_value_test", counted)
    with open_checkpoint(tmp_path / "q.gguf") as ck:
        assert ck.requantized_match("a.weight", source) == 1.0
        assert ck.requantized_match("a.weight", source + 0.3 * torch.randn(64, 64).half()) < 0.9
    assert len(calls) == 1 + 2  # float32 (= float16); float32, bfloat16 (float16 again: skipped)


def test_the_source_every_value_fits_beats_a_nearer_model_that_misses_some(tmp_path):
    """Margins were capped at 1 - 99.9 %, so an IQ4 copy (needing 99.8 %) scored alike on its source (100 %)
    and on a model missing 0.05 % of its values: the nearer one (by distance, a sketch) was named source."""
    from modelatlas.lineage.quantized import quantized_copies

    raw = make_iq4_gguf(tmp_path / "q.gguf")
    stored = torch.from_numpy(gguf.quants.dequantize(raw, Q.IQ4_NL))
    source = stored * (1 + 0.01 * torch.randn(stored.shape, generator=torch.Generator().manual_seed(0)))
    near = stored.clone()
    near[0, 0], near[40, 7] = -stored[0, 0], -stored[40, 7]  # 2 of 4096 values off their level
    save_file({"a.weight": source}, str(tmp_path / "s.safetensors"))
    save_file({"a.weight": near}, str(tmp_path / "n.safetensors"))
    ckpts = [open_checkpoint(tmp_path / f) for f in ("q.gguf", "s.safetensors", "n.safetensors")]
    assert copy_score(ckpts[0], ckpts[1]) > copy_score(ckpts[0], ckpts[2]) >= 0
    rel = np.array([[0, 0.01, 0.002], [0.01, 0, 0.01], [0.002, 0.01, 0]])  # n is nearer to q than s is
    layers = [t for t in ckpts[0].tensors()]
    assert quantized_copies(ckpts, layers, rel, [0, 1, 2]) == [(0, 1, "iq4_nl")]


HF_TO_GGUF = {"model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
              "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
              "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
              "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight"}


def make_hf_llama(folder, weights):
    """``weights`` (HF names) saved as a transformers LlamaForCausalLM folder: 2 query heads, 1 key head."""
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 2, "num_key_value_heads": 1,
           "num_hidden_layers": 1}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def make_converted(weights):
    """What llama.cpp's converter writes, by hand: GGUF names, q / k rows of each head of 32 interleaved."""
    def rows(heads):
        return [h * 32 + (j % 2) * 16 + j // 2 for h in range(heads) for j in range(32)]
    out = {HF_TO_GGUF[k]: v for k, v in weights.items()}
    out["blk.0.attn_q.weight"] = out["blk.0.attn_q.weight"][rows(2)]
    out["blk.0.attn_k.weight"] = out["blk.0.attn_k.weight"][rows(1)]
    return out


def test_a_hugging_face_model_and_its_gguf_conversions_are_compared(tmp_path):
    gen = torch.Generator().manual_seed(3)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (64, 64), "model.layers.0.self_attn.k_proj.weight": (32, 64),
              "model.layers.0.self_attn.o_proj.weight": (64, 64), "model.layers.0.mlp.up_proj.weight": (96, 64)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    ft = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    ft2 = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=gen) for k, v in ft.items()}
    paths = [make_hf_llama(tmp_path / n, w) for n, w in (("base", base), ("ft", ft), ("ft2", ft2))]
    paths.append(make_gguf(tmp_path / "base-q8_0.gguf", make_converted(base)))
    paths.append(make_gguf(tmp_path / "ft-f16.gguf", make_converted(ft), plain=tuple(HF_TO_GGUF.values())))
    forest = recover_lineage(paths, stage="specialize")
    d = forest.decisions
    assert d["architectures"] == 1 and d["gguf_names"] == {"base": "llama", "ft": "llama", "ft2": "llama"}
    assert d["precision_copies"] == {"base-q8_0": "q8_0", "ft-f16": "float16"}
    edges = {(e.parent, e.child) for e in forest.edges}
    assert {("base", "base-q8_0"), ("ft", "ft-f16")} <= edges  # copies under their own source
    assert {frozenset(e) for e in edges if "-" not in e[1]} == {frozenset(("base", "ft")), frozenset(("ft", "ft2"))}
    unpermuted = make_converted(base)
    unpermuted["blk.0.attn_q.weight"] = base["model.layers.0.self_attn.q_proj.weight"]  # rows left in HF order
    make_gguf(tmp_path / "wrong.gguf", unpermuted)
    wrong = recover_lineage([paths[0], tmp_path / "wrong.gguf"], stage="specialize")
    assert "wrong" not in wrong.decisions.get("precision_copies", {})  # a copy only in the converter's row order


def test_a_layers_pattern_in_hugging_face_names_still_compares_the_hugging_face_models(tmp_path):
    """layers='q_proj' with one GGUF file among Hugging Face models: the models were read under GGUF names, so
    the pattern matched nothing in any of them and the run stopped ('no model could be compared'). A model
    whose GGUF names the pattern does not match keeps its own names; one that names GGUF tensors joins all."""
    gen = torch.Generator().manual_seed(4)
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=gen),
            "model.layers.0.self_attn.k_proj.weight": torch.randn(32, 64, generator=gen)}
    ft = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    paths = [make_hf_llama(tmp_path / n, w) for n, w in (("base", base), ("ft", ft))]
    paths.append(make_gguf(tmp_path / "base-q8_0.gguf", make_converted(base)))
    by_hf_names = recover_lineage(paths, stage="specialize", layers="q_proj")
    assert by_hf_names.nodes == ["base", "ft"] and "gguf_names" not in by_hf_names.decisions
    assert list(by_hf_names.skipped) == ["base-q8_0"]  # its names are GGUF's: the pattern matches none
    by_gguf_names = recover_lineage(paths, stage="specialize", layers=r"attn_q\.")
    assert sorted(by_gguf_names.nodes) == ["base", "base-q8_0", "ft"] and by_gguf_names.skipped == {}
    assert by_gguf_names.decisions["gguf_names"] == {"base": "llama", "ft": "llama"}


def test_a_model_of_the_gguf_architecture_that_cannot_be_renamed_says_why(tmp_path, capsys):
    """num_key_value_heads: null leaves the q / k permutation unknown: the model was compared under its own names,
    apart from the GGUF file, and decisions said nothing of it."""
    gen = torch.Generator().manual_seed(5)
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=gen),
            "model.layers.0.self_attn.k_proj.weight": torch.randn(32, 64, generator=gen)}
    odd = make_hf_llama(tmp_path / "odd", base)
    (odd / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 2,
                                                 "num_key_value_heads": None, "num_hidden_layers": 1}))
    paths = [make_hf_llama(tmp_path / "base", base), odd, make_gguf(tmp_path / "base-q8_0.gguf", make_converted(base))]
    d = recover_lineage(paths, stage="specialize").decisions
    assert d["gguf_names"] == {"base": "llama"}
    assert d["gguf_unmapped"] == {"odd": "config.json gives no usable attention / key-value head count, which the "
                                         "conversion needs"}
    from modelatlas.cli.main import main

    assert main(["lineage", "recover", *map(str, paths), "--stage", "specialize"]) == 0
    assert "odd: compared under its own names, apart from the GGUF files: config.json gives no usable" \
        in capsys.readouterr().err


def test_a_quantized_model_whose_biases_differ_is_no_copy(tmp_path):
    """Its matrices quantize the source's exactly; its 1-D biases (kept float32 in GGUF files, never
    quantized) are another model's: it was drawn as the source's q8_0 copy."""
    p, kids = make_family(tmp_path, 2)
    gen = torch.Generator().manual_seed(7)
    bias = torch.randn(64, generator=gen)
    for name, w in {"p": p, **kids}.items():
        save_file({**w, "a.bias": bias}, str(tmp_path / f"{name}.safetensors"))
    make_gguf(tmp_path / "p-q8.gguf", {**p, "a.bias": bias})
    make_gguf(tmp_path / "bitfit-q8.gguf", {**p, "a.bias": bias * 1.1})
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    kinds = {e.child: (e.parent, e.kind) for e in forest.edges}
    assert kinds["p-q8"] == ("p", "precision")
    # a model of its own, trained from p or p from it: with its rounding taken out (lineage.rounding) its
    # matrices are p's, so nothing there says which way, and only the biases differ
    link = [e for e in forest.edges if {e.parent, e.child} == {"p", "bitfit-q8"}]
    assert [e.kind for e in link] == ["trained"] and "bitfit-q8" not in forest.decisions["duplicates"]


def test_a_quantized_copy_of_a_head_only_fine_tune_hangs_below_it(tmp_path):
    """probe (p with another head) and its q8_0 copy: the copy's compared layers equal p-q8's, so they were one
    model there; it is probe's copy (its head says so), and p-q8 p's."""
    p, kids = make_family(tmp_path, 2)
    head = torch.randn(10, 64, generator=torch.Generator().manual_seed(3))
    for name, w in {"p": p, **kids}.items():
        save_file({**w, "head.weight": head}, str(tmp_path / f"{name}.safetensors"))
    probe = {**p, "head.weight": head + 0.5}
    save_file(probe, str(tmp_path / "probe.safetensors"))
    make_gguf(tmp_path / "p-q8.gguf", {**p, "head.weight": head})
    make_gguf(tmp_path / "probe-q8.gguf", probe)
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    edges = {e.child: (e.parent, e.kind) for e in forest.edges}
    assert edges["p-q8"] == ("p", "precision") and edges["probe-q8"] == ("probe", "precision")
    assert edges["probe"] == ("p", "trained") and forest.decisions["outside_layers"]["probe"]["like"] == "p"
    assert forest.decisions["precision_copies"] == {"p-q8": "q8_0", "probe-q8": "q8_0"}


def test_a_quantized_copy_of_a_bitfit_goes_to_it_not_to_its_base(tmp_path):
    """The q8_0 of a biases-only fine-tune requantizes its base's matrices exactly too; the base came first
    among the candidates, failed on the biases, and the copy was left a model of its own."""
    p, kids = make_family(tmp_path, 2)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(7))
    for name, w in {"p": p, **kids}.items():
        save_file({**w, "a.bias": bias}, str(tmp_path / f"{name}.safetensors"))
    save_file({**p, "a.bias": bias * 1.1}, str(tmp_path / "p_bitfit.safetensors"))
    make_gguf(tmp_path / "p_bitfit-q8.gguf", {**p, "a.bias": bias * 1.1})
    make_gguf(tmp_path / "p-q8.gguf", {**p, "a.bias": bias})
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    edges = {e.child: (e.parent, e.kind) for e in forest.edges}
    assert edges["p_bitfit-q8"] == ("p_bitfit", "precision") and edges["p-q8"] == ("p", "precision")
    assert edges["p_bitfit"] == ("p", "trained") and forest.decisions["outside_layers"]["p_bitfit"]["like"] == "p"


def test_an_identical_copy_of_a_quantized_copy_is_listed_with_its_own_type(tmp_path):
    """TQ1_0 and TQ2_0 store one ternary rounding: the TQ2_0 file, an identical copy of the TQ1_0 one, was
    listed as 'tq1_0' (the type of the copy it equals), not as the 'tq2_0' it is stored in."""
    gen = torch.Generator().manual_seed(0)
    p = {k: torch.randn(64, 256, generator=gen) for k in ("a.weight", "b.weight")}  # rows of 256: TQ blocks
    save_file(p, str(tmp_path / "p.safetensors"))
    save_file({k: v + 0.05 * torch.randn(64, 256, generator=gen) for k, v in p.items()},
              str(tmp_path / "ft.safetensors"))
    make_gguf(tmp_path / "p-tq1.gguf", p, kind=Q.TQ1_0)
    make_gguf(tmp_path / "p-tq2.gguf", p, kind=Q.TQ2_0)
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    assert forest.decisions["precision_copies"] == {"p-tq1": "tq1_0", "p-tq2": "tq2_0"}


def test_a_hugging_face_model_with_a_broken_shard_index_beside_gguf_files_is_skipped(tmp_path):
    """Reading a model under GGUF names lists its tensors: a shard index naming the wrong shard ended the run
    ('error: ...') when GGUF files were among the models, instead of skipping that model."""
    gen = torch.Generator().manual_seed(6)
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=gen),
            "model.layers.0.self_attn.k_proj.weight": torch.randn(32, 64, generator=gen)}
    good = make_hf_llama(tmp_path / "base", base)
    bad = make_hf_llama(tmp_path / "bad", base)
    (bad / "model.safetensors").rename(bad / "model-00001-of-00001.safetensors")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.layers.0.self_attn.q_proj.weight": "model-00001-of-00001.safetensors",
        "model.layers.0.mlp.up_proj.weight": "model-00001-of-00001.safetensors"}}))
    forest = recover_lineage([good, bad, make_gguf(tmp_path / "base-q8_0.gguf", make_converted(base))],
                             stage="specialize")
    assert sorted(forest.nodes) == ["base", "base-q8_0"]
    assert "puts tensor 'model.layers.0.mlp.up_proj.weight' in shard" in forest.skipped["bad"]
