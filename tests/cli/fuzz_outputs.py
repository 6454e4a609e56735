"""Seeded damage for the files modelatlas writes and reads back (tests/cli/test_fuzz_outputs.py).

Each ``make_*(folder)`` writes one small valid artifact with the commands themselves, at the smallest settings
the other tests use: a ProbeX experts folder, an atlas, a distillation result folder with its checkpoint, a zoo
manifest and a forest JSON (``--truth``). :data:`ARTIFACTS` gives, per artifact, its damageable files (and their
kind for :func:`~tests.weights.fuzz_damage.make_damage`) and the commands that read it back.
:func:`check_reads_back` runs one such command through ``atlas``'s entry point on a damaged copy and accepts
only a sane success or exit code 1 with one error line naming the damaged file, within a time and memory
limit, the folder left as it was on a refusal.
"""

from __future__ import annotations

import io
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

from modelatlas.cli.main import main

DISTILL = ["distill", "run", "--method", "dm", "--ipc", "1", "--dataset", "digits", "--set", "checkpoint_every=1",
           "--set", "width=8", "--set", "batch_real=16", "--eval-nets", "1", "--eval-epochs", "1"]
RESUMED = 3  # a resume's --iterations: one more than the run saved (2), so that it trains on from the checkpoint


def make_built(root: Path) -> Path:
    """Every artifact under ``root`` (a zoo of 2 trees, hidden width 16; ~8 s): zoo/, experts/, atlas/,
    distill/ (2 iterations, a checkpoint after each), forest.json, and straight/ (3 iterations never stopped:
    what a resume to 3 must give)."""
    from modelatlas.probex.families import make_class_subset_zoo

    torch.set_num_threads(1)
    zoo = root / "zoo"
    make_class_subset_zoo(zoo, children=(24, 12), hidden=16, ft_steps=(10, 20), batch_models=24)
    for argv in (["probex", "train", str(zoo), "--layer", "layers.1.weight", "--epochs", "3", "--rank", "4",
                  "--out", str(root / "experts")],
                 ["index", "build", str(zoo), "--out", str(root / "atlas"), "--experts", str(root / "experts")],
                 [*DISTILL, "--iterations", "2", "--out", str(root / "distill")],
                 [*DISTILL, "--iterations", str(RESUMED), "--out", str(root / "straight")],
                 ["lineage", "recover", str(zoo), "--stage", "specialize", "--out", str(root / "forest.json")]):
        code, _, err = run_quiet(argv)
        assert code == 0, f"{argv[:2]}: {err}"
    return root


def run_quiet(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


# artifact -> (folder or file copied per case, {damageable file relative to it: kind})
ARTIFACTS = {
    "experts": ("experts", {"index.json": "json", "router/router.json": "json",
                            "router/router.safetensors": "safetensors", "experts/t0/expert.json": "json",
                            "experts/t0/expert.safetensors": "safetensors", "experts/t1/expert.json": "json"}),
    "atlas": ("atlas", {"atlas.json": "json"}),
    "distill": ("distill", {"result.json": "json", "synthetic.json": "json", "synthetic.safetensors": "safetensors",
                            "transform.safetensors": "safetensors"}),
    "resume": ("distill", {"checkpoint/checkpoint.json": "json", "checkpoint/run.json": "json",
                           "checkpoint/ckpt-2.safetensors": "safetensors"}),
    "manifest": ("zoo/manifest.json", {".": "json"}),
    "forest": ("forest.json", {".": "json"}),
}


def make_readers(artifact: str, built: Path, copy: Path) -> list[list[str]]:
    """The commands that read ``artifact`` (its damaged copy at ``copy``; the rest as ``built`` holds it)."""
    zoo = built / "zoo"
    models = [str(zoo / "t1-c0003.safetensors"), str(zoo / "t0-c0001.safetensors")]
    return {
        "experts": [["probex", "predict", *models, "--experts", str(copy)],
                    ["index", "build", *models, "--out", str(copy.parent / "atlas2"), "--experts", str(copy)]],
        "atlas": [["index", "show", str(copy)], ["index", "search", "t1", str(copy)]],
        "distill": [["distill", "eval", str(copy), "--eval-nets", "1", "--eval-epochs", "1"]],
        "resume": [[*DISTILL, "--iterations", str(RESUMED), "--out", str(copy), "--resume"]],
        "manifest": [["lineage", "recover", str(zoo), "--truth", str(copy), "--stage", "specialize"]],
        "forest": [["lineage", "recover", str(zoo), "--truth", str(copy), "--stage", "specialize"]],
    }[artifact]


def make_case(built: Path, case: Path, artifact: str) -> tuple[Path, dict]:
    """A fresh copy of ``artifact`` under ``case``; (the copy, {its damageable files: kind})."""
    if case.exists():
        shutil.rmtree(case)
    case.mkdir(parents=True)
    rel, files = ARTIFACTS[artifact]
    src, copy = built / rel, case / Path(rel).name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, copy)
    return copy, {(copy / f if f != "." else copy): kind for f, kind in files.items()}


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (or the file itself) and its bytes."""
    if folder.is_file():
        return {folder: folder.read_bytes()}
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def check_resumed(copy: Path, built: Path) -> None:
    """A resume that succeeded gave the synthetic set and losses of the run never stopped (a damaged checkpoint
    continued silently would give others)."""
    import json

    from safetensors.torch import load_file

    a, b = (load_file(str(d / "synthetic.safetensors")) for d in (copy, built / "straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed to another synthetic set"
    losses = [json.loads((d / "result.json").read_text())["losses"] for d in (copy, built / "straight")]
    assert losses[0] == losses[1], f"resumed to other losses: {losses}"


def check_reads_back(argv: list[str], copy: Path, damaged: Path) -> str:
    """Run ``argv``; returns "ok" or the error line. Anything else raises: a traceback, a hang, an allocation
    past the limit, more than one error line, one naming neither the damaged file nor its folder's part, files
    changed by a refused command."""
    from tests.weights.fuzz_damage import check_limits

    before = snapshot(copy)
    with check_limits(60.0, 3 * 2**30):
        code, out, err = run_quiet(argv)
    lines = err.splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ") or "Traceback" in ln]
    if code == 0:  # (notes and warnings may come: a --truth that names a model's weights otherwise)
        assert not errors, f"exit 0 with stderr {err[:300]!r}"
        return "ok"
    assert code == 1, f"exit {code}: {err[-300:]!r}"
    assert len(errors) == 1 and errors[0] == lines[-1], f"not one error line: {err[-400:]!r}"
    assert damaged.name in errors[0], f"does not name {damaged.name}: {errors[0]!r}"
    assert snapshot(copy) == before, f"refused, but changed files in {copy}"
    return errors[0]
