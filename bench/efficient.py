"""Efficient distillation benchmark: Teddy vs RaT-BPTT vs DC (accuracy, wall time, memory), Teddy under a
wall-time budget, HeLlO label storage vs accuracy. (DDM attribution: ``bench/attribution.py``.)

Parts (each prints JSON lines and writes ``--json``):
- ``distill``: each method distils in its own subprocess (so ``ru_maxrss`` is the method's own peak) and is
  evaluated under ONE protocol for all (SGD, ConvNet of the dataset, no DSA); memory = process peak RSS
  growth and the peak bytes of live autograd-saved tensors (:class:`SavedTensorMeter`, device independent).
- ``memory``: saved-tensor peak of one outer iteration vs the number of steps (Teddy ``traj_steps`` vs
  RaT-BPTT ``window``): constant for Teddy, linear for unrolled BPTT.
- ``chunk``: saved-tensor peak and time of one RaT-BPTT outer iteration with the real batch (2048) scored in
  one pass or in chunks (``real_chunk`` 512, 256): the same gradient, less memory.
- ``hello``: hard labels / stored teacher labels (one per crop per epoch, replayed crops) / HeLlO projector
  (text head, class-mean head), accuracy and bytes.
- ``budget``: Teddy as one resumed run through iteration ``--marks``, evaluated at each (accuracy vs time).

    python bench/efficient.py --part distill --dataset digits --ipc 10
    python bench/efficient.py --part memory
    python bench/efficient.py --part chunk --dataset fashion-mnist --ipc 1
    python bench/efficient.py --part hello --ipc 10
    python bench/efficient.py --part budget --dataset fashion-mnist --marks 0 80 --eval-epochs 600 \
        --config '{"width": 128, "dsa": true, "traj_steps": 1, "batch_real": 64}'
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

from modelatlas.allocator import keep_freed_memory
from modelatlas.atomic import atomic_write_json
from modelatlas.data import load_dataset
from modelatlas.distill import EvalProtocol, default_protocol, distill, evaluate_synthetic
from modelatlas.distill.methods.teddy.memory import SavedTensorMeter

CONFIGS = {"teddy": {"iterations": 40, "traj_steps": 5, "pool_size": 8, "base_steps": 300},
           "ratbptt": {"iterations": 40, "window": 10, "batch_real": 256},  # the engine of the documented rows
           "dc": {"iterations": 10}, "random": {}}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def single(args) -> dict:
    """One method in this process: distil, measure, evaluate."""
    tr, te = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
    cfg = {**CONFIGS[args.single], **json.loads(args.config or "{}")}
    rss0 = _rss_mb()
    start = time.perf_counter()
    with SavedTensorMeter() as meter:
        syn = distill(args.single, tr, args.ipc, cfg, seed=args.seed)
    wall = time.perf_counter() - start
    rss1 = _rss_mb()
    net = {"width": 64, "depth": 2} if tr.input_shape[-1] <= 16 else {"width": 128, "depth": 3}
    p = EvalProtocol(kind="sgd", num_nets=args.eval_nets, epochs=args.eval_epochs, **net)
    ev = evaluate_synthetic(syn, te, p, seed=args.seed)
    return {"method": args.single, "ipc": args.ipc, "dataset": tr.name, "config": cfg, "mean": round(ev.mean, 2),
            "std": round(ev.std, 2), "wall_s": round(wall, 1), "peak_rss_growth_mb": round(rss1 - rss0, 1),
            "peak_graph_mb": round(meter.peak / 2**20, 2), "pool_built_now": syn.meta.get("pool_built_now"),
            "protocol": ev.protocol["description"]}


def part_distill(args) -> list[dict]:
    rows = []
    for m in args.methods:
        cmd = [sys.executable, __file__, "--single", m, "--dataset", args.dataset, "--ipc", str(args.ipc),
               "--eval-nets", str(args.eval_nets), "--eval-epochs", str(args.eval_epochs), "--seed", str(args.seed)]
        cmd += ["--config", args.config] if args.config else []
        # stderr passes through: a failing method shows its error, not only a non-zero exit status
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(out, flush=True)
    return rows


def part_memory(args) -> list[dict]:
    tr = load_dataset(args.dataset, "train")
    rows = []
    for method, field, values, base in [("teddy", "traj_steps", (1, 5, 20), {"pool_size": 2, "base_steps": 50}),
                                        ("ratbptt", "window", (5, 20, 50), {"total": 60})]:
        for v in values:
            with SavedTensorMeter() as meter:
                start = time.perf_counter()
                distill(method, tr, args.ipc, {**base, "iterations": 1, field: v}, seed=args.seed)
            rows.append({"method": method, field: v, "peak_graph_mb": round(meter.peak / 2**20, 2),
                         "wall_s": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def part_chunk(args) -> list[dict]:
    tr = load_dataset(args.dataset, "train")
    base = {"iterations": 1, "window": 2, "total": 2, "batch_real": 2048, "batch_syn": 10 * args.ipc}
    rows = []
    for chunk in (None, 512, 256):
        with SavedTensorMeter() as meter:
            start = time.perf_counter()
            syn = distill("ratbptt", tr, args.ipc, {**base, "real_chunk": chunk}, seed=args.seed)
        rows.append({"method": "ratbptt", **base, "real_chunk": chunk, "peak_graph_mb": round(meter.peak / 2**20, 1),
                     "wall_s": round(time.perf_counter() - start, 1), "image_sum": round(float(syn.images.detach().sum()), 4)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def part_budget(args) -> list[dict]:
    """Teddy at each of ``--marks`` (cumulative outer iterations of ONE resumed run), scored under its
    DSA protocol; times are cumulative and include the pool build."""
    tr = load_dataset(args.dataset, "train")
    # seed + 12345: the validation split of the documented tuning runs
    tr, te = tr.holdout(args.val, args.seed + 12345) if args.val else (tr, load_dataset(args.dataset, "test"))
    rows, wall, cpu = [], 0.0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"cache_dir": f"{tmp}/pool", "checkpoint_every": 10**9, **json.loads(args.config or "{}")}
        proto = default_protocol("teddy", cfg, tr.input_shape, args.eval_nets, args.eval_epochs)
        for mark in sorted(set(args.marks)):
            (w0, c0), rss0 = _clock(), _rss_mb()
            with SavedTensorMeter() as meter:
                syn = distill("teddy", tr, args.ipc, {**cfg, "iterations": mark}, seed=args.seed,
                              checkpoint_dir=f"{tmp}/ckpt", resume=True)
            w1, c1 = _clock()
            wall, cpu = wall + w1 - w0, cpu + c1 - c0
            ev = evaluate_synthetic(syn, te, proto, seed=args.seed)
            rows.append({"method": "teddy", "dataset": tr.name, "ipc": args.ipc, "iterations": mark,
                         "split": "val" if args.val else "test", "config": cfg, "mean": round(ev.mean, 2),
                         "std": round(ev.std, 2), "accuracies": [round(a, 2) for a in ev.accuracies],
                         "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mb": round(_rss_mb(), 1),
                         "rss_growth_mb": round(_rss_mb() - rss0, 1), "peak_graph_mb": round(meter.peak / 2**20, 2),
                         "eval_s": round(time.perf_counter() - w1, 1), "load": _load(),
                         "protocol": ev.protocol["description"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def part_hello(args) -> list[dict]:
    from modelatlas.distill.evaluate import evaluate_tensors
    from modelatlas.distill.methods import get
    from modelatlas.distill.methods.hello.method import load_or_train_teacher, make_label_fn
    from modelatlas.distill.methods.hello.projector import param_bytes, stored_label_bytes
    from modelatlas.distill.nets import pick_device

    tr, te = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
    p = EvalProtocol(kind="sgd", num_nets=args.eval_nets, epochs=args.eval_epochs, dsa=True, width=64, depth=2)
    rows, crop_seed = [], 1234
    # the runs' teacher (same data, settings, seed): trained here once, then loaded from the cache by each run
    teacher = load_or_train_teacher(tr, get("hello").make_config({}), args.seed, "cpu")[0]
    device = pick_device()  # the evaluation's (CUDA when present): the projector labels its batches there
    epochs = p.resolved().epochs
    for head in ("text", "class_mean"):
        cfg = {"head_init": head, "iterations": args.hello_iterations}
        syn = distill("hello", tr, args.ipc, cfg, seed=args.seed)
        x, n, k = syn.images.detach(), len(syn), syn.num_classes
        proj_bytes = sum(v.numel() * 4 for key, v in syn.extras.items() if key.startswith("projector."))
        backbone_bytes = sum(v.numel() * 4 for key, v in syn.extras.items() if key.startswith("backbone."))
        table = _stored_labels(teacher, x, epochs, crop_seed)  # (E, N, K)
        for name, fn, nbytes, with_bb in [
                (f"HeLlO projector ({head} head)", make_label_fn(syn, device), proj_bytes, proj_bytes + backbone_bytes),
                ("stored teacher soft labels (per crop per epoch)", lambda xb, idx, e, table=table: table[e, idx],
                 stored_label_bytes(n, k, epochs), None),
                ("hard labels", None, n * 8, None)]:
            ev = evaluate_tensors(x, syn.classes, te, p, seed=args.seed, label_fn=fn, crop_seed=crop_seed)
            rows.append({"images": f"hello {head} run", "labels": name, "acc": round(ev.mean, 2),
                         "std": round(ev.std, 2), "image_bytes": x.numel() * 4, "label_bytes": nbytes,
                         "label_bytes_with_backbone": with_bb})
            print(json.dumps(rows[-1]), flush=True)
    rows.append({"teacher_test_acc": _acc(teacher, te), "backbone_params": param_bytes(teacher.features) // 4,
                 "protocol": p.resolved().to_dict()["description"]})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def _stored_labels(teacher, x, epochs: int, crop_seed: int) -> torch.Tensor:
    from modelatlas.distill.augment import DSA
    from modelatlas.seeding import derive_seed, torch_generator

    dsa, out = DSA.for_dataset(tuple(x.shape[1:])), []
    with torch.no_grad():
        for e in range(epochs):  # the crops evaluate_tensors replays with the same crop_seed
            crops = dsa.sample(torch_generator(derive_seed(crop_seed, "crop", e)), batch=len(x))
            out.append(torch.softmax(teacher(crops.apply(x)), dim=1))
    return torch.stack(out)  # (E, N, K)


def _acc(net, te) -> float:
    with torch.no_grad():
        return round(100.0 * float((net(te.x).argmax(1) == te.y).float().mean()), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["distill", "memory", "chunk", "hello", "budget"], default="distill")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help="JSON of config fields: Teddy's (--part budget); merged into "
                    "every method's bench config (--part distill, --single)")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=["teddy", "ratbptt", "dc"], choices=list(CONFIGS))
    ap.add_argument("--eval-nets", type=int, default=3)
    ap.add_argument("--eval-epochs", type=int, default=300)
    ap.add_argument("--hello-iterations", type=int, default=100)
    ap.add_argument("--marks", type=int, nargs="+", default=[0, 40, 80], help="budget: iteration marks")
    ap.add_argument("--val", type=float, default=None, help="budget: tune on this held-out fraction of train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    keep_freed_memory()  # large blocks stay mapped between steps (modelatlas.allocator)
    torch.set_num_threads(1)
    if args.single:
        print(json.dumps(single(args)), flush=True)
        return
    rows = {"distill": part_distill, "memory": part_memory, "chunk": part_chunk, "hello": part_hello, "budget": part_budget}[args.part](args)
    if args.json:
        atomic_write_json(args.json, rows, indent=1)


if __name__ == "__main__":
    main()
