"""Device check of the distillation code: every method at tiny scale on a GPU (or any device), then the poster
timings that size a GPU rerun of the Fashion-MNIST poster benchmark. Prepared for the lent GPU machine, whose
time is short: one call, a few minutes, a JSON of everything and a short table printed last.

Per method (digits, IPC 1, tiny configs; ``--methods`` picks):
- ``finite``: the synthetic images and labels hold no NaN/inf; ``on``: the device the run's tensors came back on;
- ``same_seed``: two runs with the same seed give bit-identical images (``max_diff``: the largest difference);
  CUDA kernels need not be deterministic, so a False here says where "same seed, same result" fails on the device;
- ``resume``: a run stopped after part of its iterations and resumed equals the straight run bit for bit
  (methods with an outer loop; None where the method has none);
- ``vs_cpu``: the largest |difference| between the device's images and the CPU's (same seed) over their scale;
- ``acc``: one evaluation net trained on the set for a few epochs on the device, test accuracy (a smoke figure);
- ``s``: wall seconds of the first run.

Timing (``--timing``, the benchmark's 1-IPC poster settings on ``--timing-dataset``): seconds per outer iteration
of PoDD (from runs of ``--timing-iters`` and twice that, so the set-up cancels), and seconds per epoch of one
SGD+DSA evaluation net on the poster's crops; with them the time of the 150-iteration poster and its 5-net,
1,000-epoch evaluation is projected.

    PYTHONPATH=src python3 bench/device_check.py --timing --timing-root .data/fashion-mnist --out "$OUT"
    python bench/device_check.py --device cpu --methods dm podd --eval-epochs 2      # here (tests do this)

The device machine has torch, scikit-learn and safetensors but no Fashion-MNIST: copy its IDX files into the
checkout first (``mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/``, an ignored path) and name
``.data`` in the run's ``carry``. Without them the timing row says why and the method rows still come back.

Time: O(methods x tiny runs); the timing part O(3 x timing_iters poster iterations + eval epochs).
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from modelatlas.atomic import atomic_write_json
from modelatlas.data import load_dataset
from modelatlas.distill import default_protocol, distill, evaluate_synthetic
from modelatlas.distill.nets import pick_device

# Tiny configs (as the unit tests use): seconds on 2 CPU cores. Methods with an outer loop checkpoint every
# iteration, so that a resume after half of them can be compared with the straight run.
TINY = {"random": {}, "herding": {"train_steps": 5, "width": 8},
        "dc": {"iterations": 2, "width": 8, "batch_real": 16},
        "dsa": {"iterations": 2, "width": 8, "batch_real": 16},
        "dm": {"iterations": 2, "width": 8, "batch_real": 16},
        "mtt": {"iterations": 2, "num_experts": 2, "expert_epochs": 3, "max_start_epoch": 1, "syn_steps": 2,
                "width": 8},
        "ratbptt": {"iterations": 2, "total": 6, "window": 2, "batch_real": 32, "width": 8},
        "podd": {"iterations": 2, "total": 4, "window": 2, "batch_real": 32, "width": 8},
        "teddy": {"iterations": 2, "width": 8, "batch_real": 16, "base_steps": 6, "pool_size": 4,
                  "finetune_steps": 2, "traj_steps": 2},
        "hello": {"iterations": 2, "width": 8, "batch_real": 16, "teacher_steps": 5, "projector_steps": 3,
                  "head_init": "class_mean"}}
CACHED = ("mtt", "teddy")  # methods that cache an expert buffer / model pool: each check gets its own folder

# The Fashion-MNIST 1-IPC poster of docs/benchmarks.md (session 4): the digits defaults, 64 crops per inner step
POSTER = {"poster_ipc": 1.0, "batch_syn": 64}
POSTER_ITERATIONS, EVAL_NETS, EVAL_EPOCHS = 150, 5, 1000


def _config(name: str, cache: Path, **extra) -> dict:
    cfg = {**TINY[name], **extra}
    if name in CACHED:
        cfg["cache_dir"] = str(cache / name)
    if "iterations" in cfg:
        cfg["checkpoint_every"] = 1
    return cfg


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max())


def _resume_equal(name: str, train, device, cache: Path, straight) -> bool | None:
    """Stop after the first iteration, resume to the end; bit-identical to ``straight``? None: no outer loop."""
    total = TINY[name].get("iterations")
    if total is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "ckpt"
        distill(name, train, 1, _config(name, cache, iterations=1), seed=0, checkpoint_dir=ck, device=device)
        resumed = distill(name, train, 1, _config(name, cache), seed=0, checkpoint_dir=ck, resume=True,
                          device=device)
    return bool(torch.equal(resumed.images.detach().cpu(), straight.images.detach().cpu()))


def check_method(name: str, train, test, device: torch.device, cache: Path, eval_epochs: int) -> dict:
    """One method's row (module docstring)."""
    start = time.perf_counter()
    a = distill(name, train, 1, _config(name, cache), seed=0, device=device)
    took = time.perf_counter() - start
    b = distill(name, train, 1, _config(name, cache), seed=0, device=device)
    cpu = distill(name, train, 1, _config(name, cache), seed=0, device="cpu") if device.type != "cpu" else a
    scale = float(cpu.images.detach().abs().max()) or 1.0
    finite = bool(torch.isfinite(a.images.detach()).all() and torch.isfinite(a.targets().detach()).all())
    proto = replace(default_protocol(name, _config(name, cache), train.input_shape, eval_nets=1), epochs=eval_epochs)
    ev = evaluate_synthetic(a, test, proto, seed=0, device=str(device))
    return {"method": name, "finite": finite, "on": str(a.images.device),
            "same_seed": bool(torch.equal(a.images.detach().cpu(), b.images.detach().cpu())),
            "max_diff": _max_diff(a.images, b.images), "resume": _resume_equal(name, train, device, cache, a),
            "vs_cpu": _max_diff(a.images, cpu.images) / scale, "acc": round(ev.mean, 2), "s": round(took, 2)}


def _guarded(name: str, *args) -> dict:
    """``check_method``, with a failure recorded as the row (the other methods still run)."""
    try:
        return check_method(name, *args)
    except Exception as err:  # noqa: BLE001 -- a device run must report every method, not stop at the first
        return {"method": name, "error": f"{type(err).__name__}: {err}"[:300]}


def _poster_seconds(train, iters: int, device: torch.device, cfg: dict):
    """(SyntheticSet after ``iters`` iterations, its wall seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    syn = distill("podd", train, 1, {**cfg, "iterations": iters}, seed=0, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return syn, time.perf_counter() - start


def poster_timing(train, test, device: torch.device, iters: int, eval_epochs: int, cfg: dict) -> dict:
    """Seconds per poster outer iteration and per SGD+DSA evaluation epoch; the projected benchmark run."""
    _poster_seconds(train, 1, device, cfg)  # warm-up: kernels, allocator, the PoCO text model
    _, short = _poster_seconds(train, iters, device, cfg)
    syn, long = _poster_seconds(train, 2 * iters, device, cfg)
    per_iter = max(long - short, 0.0) / iters
    proto = replace(default_protocol("podd", cfg, train.input_shape, eval_nets=1), kind="sgd", dsa=True, lr=None,
                    epochs=eval_epochs)
    start = time.perf_counter()
    ev = evaluate_synthetic(syn, test, proto, seed=0, device=str(device))
    per_epoch = (time.perf_counter() - start) / eval_epochs
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"dataset": train.name, "config": cfg, "s_per_iteration": round(per_iter, 3),
            "s_per_eval_epoch": round(per_epoch, 4), "eval_acc_short": round(ev.mean, 2),
            "projected_poster_s": round(POSTER_ITERATIONS * per_iter, 1),
            "projected_eval_s": round(EVAL_NETS * EVAL_EPOCHS * per_epoch, 1),
            "peak_gib": None if peak is None else round(peak, 2), "crops": int(syn.images.shape[0])}


def table(rows: list[dict]) -> str:
    keys = ("finite", "on", "same_seed", "max_diff", "resume", "vs_cpu", "acc", "s")
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        cells = [r.get("error", "")] + [""] * (len(keys) - 1) if "error" in r else [
            f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _environment(device: torch.device) -> dict:
    """Versions, device, and torch's CUDA precision settings (cuDNN convolutions run in TF32 by default: a
    ``vs_cpu`` of ~1e-3 is that, not a bug; atomics in some backward kernels make ``same_seed`` fail)."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "threads": torch.get_num_threads(), "cudnn_conv_tf32": torch.backends.cudnn.allow_tf32,
           "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
           "cudnn_deterministic": torch.backends.cudnn.deterministic}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda / cuda:N / cpu (default: CUDA when present)")
    ap.add_argument("--methods", nargs="+", default=sorted(TINY), choices=sorted(TINY))
    ap.add_argument("--eval-epochs", type=int, default=100, help="epochs of each method's smoke evaluation net")
    ap.add_argument("--timing", action="store_true", help="also time the 1-IPC poster (module docstring)")
    ap.add_argument("--timing-dataset", default="fashion-mnist")
    ap.add_argument("--timing-root", default=None, help="folder of the dataset's files (e.g. Fashion-MNIST IDX)")
    ap.add_argument("--timing-iters", type=int, default=3)
    ap.add_argument("--timing-epochs", type=int, default=20)
    ap.add_argument("--timing-config", default=None, help="JSON replacing the poster config (e.g. tiny, for tests)")
    ap.add_argument("--out", default=None, help="folder for device_check.json (e.g. the device machine's $OUT)")
    return ap.parse_args(argv)


def _timing(args, device: torch.device) -> dict:
    kw = {"root": args.timing_root} if args.timing_root else {}
    try:
        train, test = (load_dataset(args.timing_dataset, s, **kw) for s in ("train", "test"))
    except Exception as err:  # noqa: BLE001 -- no dataset on the device machine: say so, keep the method rows
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    cfg = json.loads(args.timing_config) if args.timing_config else dict(POSTER)
    return poster_timing(train, test, device, args.timing_iters, args.timing_epochs, cfg)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    device = pick_device(args.device)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    report = {"environment": _environment(device), "methods": []}
    with tempfile.TemporaryDirectory() as cache:
        for name in args.methods:
            report["methods"].append(_guarded(name, train, test, device, Path(cache), args.eval_epochs))
            print(json.dumps(report["methods"][-1]), flush=True)
    if args.timing:
        report["timing"] = _timing(args, device)
    if args.out:
        atomic_write_json(Path(args.out) / "device_check.json", report)
    print(table(report["methods"]))
    if "timing" in report:
        print(json.dumps(report["timing"]))
    return 1 if any("error" in r or not r["finite"] for r in report["methods"]) else 0


if __name__ == "__main__":
    sys.exit(main())
