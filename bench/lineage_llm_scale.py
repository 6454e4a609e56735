"""Lineage at the scale users have: a family of Llama-shaped checkpoints of ~1B parameters each.

The accuracy suites use small trained models; this bench asks what a user with a folder of real-size
checkpoints waits for and how much memory it takes. It writes Hugging Face folders (``config.json`` and
``model.safetensors``, bfloat16, or shards with ``model.safetensors.index.json`` under ``--shard-gb``) of a
model the shape of Llama-3.2-1B (``--preset 1b``: 16 blocks of hidden 2048, 32 query / 8 key-value heads, MLP
8192, vocabulary 128256, tied head; 1.24 B parameters, 2.47 GB a file) and of its fine-tunes: a root of
heavy-tailed (Laplace) weights and, below it, ``--children`` fine-tunes per node down to ``--depth`` levels,
each every tensor plus Gaussian noise of 0.5-2 % of its spread (a different size per edge) with its outliers
(beyond 2.5 spreads) shrunk by 0.2-0.6 % ("specialize", as fine-tuning an LLM on narrow data does). The
shrink is shared by siblings (the same outliers, moved the same way): at 1-3 %, as first written, its energy
matched the noise's, two siblings read nearer each other than their parent and one hung from the other
(5 of 6 edges right; the like-task siblings of docs/benchmarks.md). In bfloat16
(8 bits of mantissa, a relative step of 0.4-0.8 %) much of such a step rounds back to the parent's value, as
real fine-tunes do. Writing takes ~30 s a model on 2 cores.

Then, each in a fresh process: reading every checkpoint once (every tensor of every file copied into memory)
and ``recover_lineage`` over the folders, from a cold page cache (pages dropped with posix_fadvise, checked
against /proc/self/io as in bench/lineage.py) and warm (only when the files fit in memory twice over), with
each process's peak anonymous memory (RssAnon, sampled every 20 ms) and peak resident set (VmHWM, which counts
the memory-mapped file pages too). Printed: times, ratios, memory and the directed-edge accuracy.

    python bench/lineage_llm_scale.py --work /tmp/llm1b --preset 1b --children 2 --depth 2 --reps 2

``--preset tiny`` (hidden 256, 2 blocks) runs the same in seconds.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from quantized_memory import rss  # bench/quantized_memory.py: a /proc/self/status size
from safetensors import safe_open
from safetensors.torch import save_file

PRESETS = {
    "1b": dict(hidden=2048, blocks=16, heads=32, kv_heads=8, mlp=8192, vocab=128256),  # Llama-3.2-1B's shape
    "tiny": dict(hidden=256, blocks=2, heads=8, kv_heads=2, mlp=512, vocab=1000),
}


def tensor_shapes(p: dict) -> dict[str, tuple[int, ...]]:
    """Llama's tensor names and shapes (tied head: no lm_head)."""
    h, kv = p["hidden"], p["hidden"] // p["heads"] * p["kv_heads"]
    out = {"model.embed_tokens.weight": (p["vocab"], h)}
    for b in range(p["blocks"]):
        pre = f"model.layers.{b}."
        out.update({pre + "self_attn.q_proj.weight": (h, h), pre + "self_attn.k_proj.weight": (kv, h),
                    pre + "self_attn.v_proj.weight": (kv, h), pre + "self_attn.o_proj.weight": (h, h),
                    pre + "mlp.gate_proj.weight": (p["mlp"], h), pre + "mlp.up_proj.weight": (p["mlp"], h),
                    pre + "mlp.down_proj.weight": (h, p["mlp"]),
                    pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,)})
    out["model.norm.weight"] = (h,)
    return out


def config_json(p: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": p["hidden"],
            "num_hidden_layers": p["blocks"], "num_attention_heads": p["heads"],
            "num_key_value_heads": p["kv_heads"], "intermediate_size": p["mlp"], "vocab_size": p["vocab"],
            "tie_word_embeddings": True, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}


def root_tensor(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Laplace weights of spread 0.02 (excess kurtosis 3, heavy-tailed as trained weights are); norms ~1."""
    if len(shape) == 1:
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    u = torch.rand(shape, generator=gen).clamp_(min=1e-12)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return u.log_().mul_(sign).mul_(0.02 / 2**0.5)


def child_tensor(x: torch.Tensor, gen: torch.Generator, step: float, shrink: float) -> torch.Tensor:
    """``x`` fine-tuned: outliers beyond 2.5 spreads shrunk by ``shrink`` (kurtosis falls: "specialize"), plus
    Gaussian noise of ``step`` spreads. float32 in, float32 out."""
    sd = x.std()
    y = torch.where(x.abs() > 2.5 * sd, x * (1 - shrink), x)
    return y.add_(torch.randn(x.shape, generator=gen), alpha=float(step * sd))


def write_folder(folder: Path, tensors: dict[str, torch.Tensor], preset: dict, shard_gb: float | None) -> None:
    """A Hugging Face folder: config.json and one safetensors file, or shards of at most ``shard_gb`` GB with
    their index. Written under a temporary name and renamed, so a killed run leaves no half model."""
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config_json(preset), indent=1))
    groups, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shard_gb and groups[-1] and size + nbytes > shard_gb * 1e9:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, names in enumerate(groups):
            file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, str(tmp / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in names})
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    os.replace(tmp, folder)


def read_model(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def plan(children: int, depth: int) -> dict[str, str | None]:
    """name -> parent: root ``m``, its children ``m.0`` .. down to ``depth`` levels."""
    parents, frontier = {"m": None}, ["m"]
    for _ in range(depth):
        frontier = [f"{p}.{c}" for p in frontier for c in range(children)]
        parents.update({n: n.rsplit(".", 1)[0] for n in frontier})
    return parents


def build(work: Path, preset: dict, parents: dict, seed: int, shard_gb: float | None) -> None:
    """Write every model of ``parents`` not yet in ``work`` (each from its parent's files), and the truth."""
    shapes = tensor_shapes(preset)
    for i, (name, parent) in enumerate(parents.items()):
        folder = work / name
        if folder.exists():
            continue
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed * 10_007 + i)
        step, shrink = 0.005 + 0.015 * torch.rand((), generator=gen).item(), 0.002 + 0.004 * torch.rand((), generator=gen).item()
        base = None if parent is None else read_model(work / parent)
        tensors = {}
        for k, s in shapes.items():
            x = root_tensor(s, gen) if base is None else child_tensor(base.pop(k).float(), gen, step, shrink)
            tensors[k] = x.bfloat16()
        write_folder(folder, tensors, preset, shard_gb)
        print(f"wrote {name} (parent {parent}) in {time.perf_counter() - t0:.0f} s", flush=True)
    (work / "truth.json").write_text(json.dumps(parents, indent=1))


class PeakMemory:
    """Peak RssAnon (anonymous memory: what the process allocated) sampled every ``every`` s, and VmHWM (peak
    resident set, mapped file pages included) at the end, from /proc/self/status."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak_anon, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak_anon = max(self.peak_anon, rss("RssAnon:"))

    def __enter__(self) -> PeakMemory:
        self.base_anon = rss("RssAnon:")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, rss("RssAnon:"))


def one(kind: str, work: Path, names: list[str], threads: int) -> dict:
    """In this process: read every file once (``kind="read"``) or recover the lineage (``"recover"``)."""
    torch.set_num_threads(threads)
    from lineage import disk_bytes, read_floor  # bench/lineage.py
    from modelatlas.lineage import recover_lineage
    from modelatlas.lineage.scoring import score_forest

    paths = [work / n for n in names]
    before, out = disk_bytes(), {}
    with PeakMemory() as mem:
        t = time.perf_counter()
        if kind == "read":
            read_floor(paths)
        else:
            forest = recover_lineage(paths)
            truth = json.loads((work / "truth.json").read_text())
            score = score_forest(forest, {model_name(n): truth[model_name(n)] for n in names})
            out.update(directed=score.directed, correct=score.n_correct, edges=score.n_true_edges,
                       stage=forest.decisions["stage"], trees=forest.decisions["n_trees"])
        out["seconds"] = time.perf_counter() - t
    out.update(anon_mb=(mem.peak_anon - mem.base_anon) / 1e6, hwm_mb=rss("VmHWM:") / 1e6)
    out["disk_mb"] = None if before is None else (disk_bytes() - before) / 1e6
    return out


def measure(kind: str, work: Path, names: list[str], cold: bool, threads: int) -> dict:
    """:func:`one` in a fresh process, its pages dropped first (``cold``) or read once first (warm)."""
    from lineage import evict, read_floor

    paths = [work / n for n in names]
    evict(paths) if cold else read_floor(paths, touch=False)
    cmd = [sys.executable, __file__, "--one", kind, "--work", str(work), "--threads", str(threads), "--names", *names]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(rows: dict[str, list[dict]], gb: float) -> None:
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    print(f"\n{gb:.2f} GB of files; medians of {len(next(iter(rows.values())))} (each a fresh process)")
    for key, rs in rows.items():
        extra = f", directed {rs[0]['correct']}/{rs[0]['edges']}, stage {rs[0]['stage']}" if "directed" in rs[0] else ""
        disk = "" if rs[0]["disk_mb"] is None else f", {med([r['disk_mb'] for r in rs]) / 1e3:.2f} GB from disk"
        each = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        print(f"{key:>14}: {med([r['seconds'] for r in rs]):7.1f} s ({each}), "
              f"peak anon {med([r['anon_mb'] for r in rs]):.0f} MB, VmHWM {med([r['hwm_mb'] for r in rs]):.0f} MB{disk}{extra}")
    for mode in ("cold", "warm"):
        if f"recover {mode}" in rows and f"read {mode}" in rows:
            ratio = med([r["seconds"] for r in rows[f"recover {mode}"]]) / med([r["seconds"] for r in rows[f"read {mode}"]])
            print(f"recover / read, {mode}: {ratio:.2f}x")


def model_name(file: str) -> str:
    """The model a file or folder of the work folder holds: ``m.0`` for ``m.0`` and ``m.0.gguf``."""
    return file[:-len(".gguf")] if file.endswith(".gguf") else file


def to_gguf(work: Path, names: list[str], kind: str, llamacpp: Path) -> Path:
    """Each model of ``work`` as a ``kind`` GGUF file in ``work/gguf-<kind>`` (llama.cpp's converter to bfloat16,
    then its ``build/bin/llama-quantize``; the bfloat16 file removed), made once; and the truth beside them."""
    out = work / f"gguf-{kind.lower()}"
    out.mkdir(exist_ok=True)
    script = out / "convert.py"
    from lineage_hf_gguf import CONVERT  # bench/lineage_hf_gguf.py: the converter without a tokenizer

    script.write_text(CONVERT.format(root=str(llamacpp)))
    for n in names:
        final = out / f"{n}.gguf"
        if final.exists():
            continue
        t0, bf16 = time.perf_counter(), out / f"{n}.bf16.tmp"
        subprocess.run([sys.executable, str(script), str(work / n), "--outtype", "bf16", "--outfile", str(bf16)],
                       check=True, capture_output=True)
        tmp = out / f"{n}.{kind}.tmp"
        subprocess.run([str(llamacpp / "build/bin/llama-quantize"), str(bf16), str(tmp), kind, "2"],
                       check=True, capture_output=True)
        bf16.unlink()
        os.replace(tmp, final)
        print(f"converted {n} to {kind} in {time.perf_counter() - t0:.0f} s", flush=True)
    (out / "truth.json").write_text((work / "truth.json").read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--children", type=int, default=2)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=None, help="shard each model's files at this size")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warm", action="store_true", help="also time from a warm page cache")
    ap.add_argument("--gguf", metavar="TYPE", help="time the models as llama.cpp TYPE files (Q4_K_M, Q8_0, ...)")
    ap.add_argument("--llamacpp", type=Path, help="llama.cpp source tree with build/bin/llama-quantize (--gguf)")
    ap.add_argument("--one", choices=("read", "recover"), help=argparse.SUPPRESS)
    ap.add_argument("--names", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.work, a.names, a.threads)))
        return
    parents = plan(a.children, a.depth)
    a.work.mkdir(parents=True, exist_ok=True)
    build(a.work, PRESETS[a.preset], parents, a.seed, a.shard_gb)
    names = list(parents)
    if a.gguf:
        if a.llamacpp is None:
            ap.error("--gguf needs --llamacpp (the llama.cpp source tree with build/bin/llama-quantize)")
        a.work, names = to_gguf(a.work, names, a.gguf, a.llamacpp), [f"{n}.gguf" for n in names]
    modes = ["cold"] + (["warm"] if a.warm else [])
    rows: dict[str, list[dict]] = {}
    for _ in range(a.reps):
        for mode in modes:
            for kind in ("read", "recover"):
                rows.setdefault(f"{kind} {mode}", []).append(measure(kind, a.work, names, mode == "cold", a.threads))
    gb = sum(f.stat().st_size for n in names for f in ([a.work / n] if (a.work / n).is_file() else (a.work / n).iterdir())) / 1e9
    report(rows, gb)


if __name__ == "__main__":
    main()
