"""Merged QLoRA models in trained zoos: one model per tree replaced by its QLoRA-style merge, lineage recovered
with and without recognising it (lineage.qlora).

The merge of model ``m`` (parent ``p``): ``p`` rounded to NF4 the way bitsandbytes does (blockwise absmax of 64
flattened values, nearest NF4 book value), dequantized, plus ``m``'s true update ``m - p``, saved as bfloat16
(2-D float layers; the others are ``m``'s, as QLoRA keeps them in float). Its parent's NF4 file is not given.
Reported per zoo: the RMS distance of the merge and of ``m`` to ``m``'s relatives (parent, children), as read
and with the rounding variance read off the merge taken out, and the directed edges right out of the
zoo's (``score_forest``), detection off and on. Time O(zoo size x models) per zoo.

Usage: ``python bench/qlora_merge.py ZOO_DIR [ZOO_DIR ...]`` (zoos as ``modelatlas.zoo`` writes them, with a
``manifest.json``).
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import modelatlas.lineage.recover as R
from modelatlas.lineage import recover_lineage
from modelatlas.lineage.scoring import score_forest
from modelatlas.weights import bnb as B

BLOCK = 64  # bitsandbytes' default 4-bit block size (QLoRA's)


def nf4_dequantized(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``w`` rounded to NF4 (per block of ``block`` flattened values: the absmax, the nearest book value of
    ``w / absmax``) and dequantized, float32 of ``w``'s shape. Time O(P)."""
    flat = w.reshape(-1).float()
    scale = flat.view(-1, block).abs().amax(1).repeat_interleave(block)  # (P,)
    return (B.NF4[B.requantize_4bit(flat, B.NF4, block).long()] * scale).reshape(w.shape)


def merge_of(model: dict, parent: dict) -> dict:
    """``model`` as a merged QLoRA model of ``parent``: its 2-D float layers NF4(parent) + (model - parent) in
    bfloat16, its other tensors unchanged."""
    out = {}
    for k, w in model.items():
        if w.dim() == 2 and w.is_floating_point() and w.numel() % BLOCK == 0:
            out[k] = (nf4_dequantized(parent[k]) + (w.float() - parent[k].float())).to(torch.bfloat16)
        else:
            out[k] = w
    return out


def rms(a: dict, b: dict, debias: bool = False) -> float:
    """RMS difference of the 2-D layers of two models; ``debias``: less ``a``'s rounding variance read off
    its values (``merged_variance_4bit``)."""
    d2, v, n = 0.0, 0.0, 0
    for k, w in a.items():
        if w.dim() != 2 or w.numel() % BLOCK:
            continue
        d2 += float((w.float() - b[k].float()).square().sum())
        v += float(B.merged_variance_4bit(w, B.NF4, BLOCK).sum()) if debias else 0.0
        n += w.numel()
    return max(d2 - v, 0.0) ** 0.5 / n**0.5


def run_zoo(zoo: Path) -> dict:
    """One zoo: the first child of each root replaced by its merge; distances and scores."""
    manifest = json.loads((zoo / "manifest.json").read_text())
    truth = {m["name"]: m["parent"] for m in manifest["models"]}
    models = {m["name"]: load_file(str(zoo / m["path"] / "model.safetensors")) for m in manifest["models"]}
    replaced = sorted(min(c for c, p in truth.items() if p == r) for r, p0 in truth.items() if p0 is None)
    given = dict(models)
    rows = []
    for name in replaced:
        parent = truth[name]
        given[name] = merge_of(models[name], models[parent])
        kin = [parent] + [c for c, p in truth.items() if p == name]
        rows.append({"model": name, "to": kin,
                     "true": [round(rms(models[name], models[k]), 5) for k in kin],
                     "merge": [round(rms(given[name], models[k]), 5) for k in kin],
                     "merge_debiased": [round(rms(given[name], models[k], True), 5) for k in kin]})
    scores = {}
    for label, fn in (("off", lambda m, _l: (m, [])), ("on", R.mark_merges)):
        keep, R.mark_merges = R.mark_merges, fn
        try:
            forest = recover_lineage(given)
        finally:
            R.mark_merges = keep
        s = score_forest(forest, truth)
        scores[label] = {"correct": s.n_correct, "of": s.n_true_edges, "errors": s.errors, "detected": forest.decisions.get("nf4_merges", [])}
    clean = score_forest(recover_lineage(models), truth).n_correct
    return {"zoo": zoo.name, "distances": rows, "scores": scores, "without_merges": clean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoos", nargs="+", type=Path, help="zoo folders, each with the manifest.json modelatlas.zoo writes")
    for path in ap.parse_args().zoos:
        print(json.dumps(run_zoo(path)))


if __name__ == "__main__":
    main()
