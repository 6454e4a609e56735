"""Seeded damage for the files modelatlas writes and reads back (tests/cli/test_fuzz_outputs.py).

:func:`make_built` writes small valid artifacts with the commands themselves, at the smallest settings the
other tests use: a ProbeX experts folder, an atlas, a distillation result folder with its checkpoint, a zoo
manifest and a parents map (``--truth``), a forest JSON (refused as ``--truth``; replaced by a rerun's ``--out``),
an interrupted attribution (``--resume``). :data:`ARTIFACTS` gives, per artifact, its damageable files (and their
kind for :func:`~tests.weights.fuzz_damage.make_damage`) and the commands that read it back.
:func:`check_reads_back` runs one such command through ``atlas``'s entry point on a damaged copy and accepts
only a sane success or exit code 1 with one error line naming the damaged file, within a time and memory
limit, the folder left as it was on a refusal.
"""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

from modelatlas.cli.main import main
from modelatlas.zoo.manifest import load_manifest

DISTILL = ["distill", "run", "--method", "dm", "--ipc", "1", "--dataset", "digits", "--set", "checkpoint_every=1",
           "--set", "width=8", "--set", "batch_real=16", "--eval-nets", "1", "--eval-epochs", "1"]
RESUMED = 3  # a resume's --iterations: one more than the run saved (2), so that it trains on from the checkpoint


ATTRIBUTE = ["attribute", "--clusters-per-class", "2", "--max-train", "200", "--max-test", "20", "--train-steps", "2",
             "--match-steps", "1", "--validate"]
# what each artifact's cases need built, in order, each once (the experts need the zoo, the atlas the experts)
NEEDS = {"experts": ("zoo", "experts"), "atlas": ("zoo", "experts", "atlas"), "distill": ("distill",),
         "resume": ("distill",), "manifest": ("zoo",), "forest": ("zoo", "forest"), "parents": ("zoo", "parents"),
         "attribution": ("attribution",)}


def make_built(root: Path, artifact: str) -> Path:
    """What ``artifact``'s cases read, under ``root``, each piece built once (all: ~8 s): zoo/ (2 trees of 10,
    hidden width 16), experts/, atlas/, forest.json, distill/ (2 iterations, a checkpoint after each) with
    straight/ (3 iterations never stopped: what a resume to 3 must give), attribution/ (interrupted after 3 of
    its 20 leave-one-cluster-out retrainings) with attribution-straight/."""
    torch.set_num_threads(1)
    for piece in NEEDS[artifact]:
        if not (root / piece).exists() and not (root / f"{piece}.json").exists():
            _BUILD[piece](root)
    return root


def _make_zoo(root: Path) -> None:
    from modelatlas.probex.families import make_class_subset_zoo

    make_class_subset_zoo(root / "zoo", children=(10, 10), hidden=16, ft_steps=(5, 5), batch_models=10)


def _run(*argvs: list[str], code: int = 0) -> None:
    for argv in argvs:
        got, _, err = run_quiet(argv)
        assert got == code, f"{argv[:2]}: {err}"


def _make_attribution(root: Path) -> None:
    """An attribution interrupted (Ctrl-C) after 3 retrainings, and the run never stopped."""
    from modelatlas.attribution import target

    real, calls = target.train, []

    def train(*args, **kwargs):
        if kwargs.get("weights") is not None:  # a leave-one-cluster-out retraining
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    _run([*ATTRIBUTE, "--out", str(root / "attribution-straight")])
    target.train = train
    try:
        _run([*ATTRIBUTE, "--out", str(root / "attribution")], code=130)
    finally:
        target.train = real


_BUILD = {
    "zoo": _make_zoo,
    "experts": lambda root: _run(["probex", "train", str(root / "zoo"), "--layer", "layers.1.weight", "--epochs",
                                  "3", "--rank", "4", "--out", str(root / "experts")]),
    "atlas": lambda root: _run(["index", "build", str(root / "zoo"), "--out", str(root / "atlas"), "--experts",
                                str(root / "experts")]),
    "forest": lambda root: _run(["lineage", "recover", str(root / "zoo"), "--stage", "specialize", "--out",
                                 str(root / "forest.json")]),
    "distill": lambda root: _run([*DISTILL, "--iterations", "2", "--out", str(root / "distill")],
                                 [*DISTILL, "--iterations", str(RESUMED), "--out", str(root / "straight")]),
    "parents": lambda root: (root / "parents.json").write_text(json.dumps(  # {"model": "its parent" or null}
        {r.name: r.parent for r in load_manifest(root / "zoo").models})),
    "attribution": _make_attribution,
}


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
    "parents": ("parents.json", {".": "json"}),
    "attribution": ("attribution", {"checkpoint/run.json": "json", "checkpoint/loo.json": "json",
                                    "checkpoint/ddm.safetensors": "safetensors",
                                    "checkpoint/loo-3.safetensors": "safetensors", "attribution.json": "json"}),
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
        "forest": [["lineage", "recover", str(zoo), "--truth", str(copy), "--stage", "specialize"],  # refused
                   ["lineage", "recover", str(zoo), "--stage", "specialize", "--out", str(copy)]],  # a rerun's
        "parents": [["lineage", "recover", str(zoo), "--truth", str(copy), "--stage", "specialize"]],
        "attribution": [[*ATTRIBUTE, "--out", str(copy), "--resume"]],
    }[artifact]


NOTES = "user-notes.txt"


def make_case(built: Path, case: Path, artifact: str) -> tuple[Path, dict]:
    """A fresh copy of ``artifact`` under ``case``; (the copy, {its damageable files: kind})."""
    if case.exists():
        shutil.rmtree(case)
    case.mkdir(parents=True)
    rel, files = ARTIFACTS[artifact]
    src, copy = built / rel, case / Path(rel).name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, copy)
    if copy.is_dir():  # a file of the user's beside ours: no command may touch it (check_reads_back)
        (copy / NOTES).write_text("the user's own notes\n")
    return copy, {(copy / f if f != "." else copy): kind for f, kind in files.items()}


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (or the file itself) and its bytes."""
    if folder.is_file():
        return {folder: folder.read_bytes()}
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def check_resumed(artifact: str, copy: Path, built: Path) -> None:
    """A resume that succeeded gave the tensors (and the losses) of the run never stopped (a damaged checkpoint
    continued silently would give others)."""
    from safetensors.torch import load_file

    name, straight = (("synthetic.safetensors", "straight") if artifact == "resume" else
                      ("attribution.safetensors", "attribution-straight"))
    a, b = (load_file(str(d / name)) for d in (copy, built / straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"resumed to another {name}"
    if artifact == "resume":
        losses = [json.loads((d / "result.json").read_text())["losses"] for d in (copy, built / straight)]
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
    notes = copy / NOTES
    assert not before.get(notes) or notes.read_bytes() == before[notes], f"{notes} changed or was removed"
    if code == 0:  # (notes and warnings may come: a --truth that names a model's weights otherwise)
        assert not errors, f"exit 0 with stderr {err[:300]!r}"
        return "ok"
    assert code == 1, f"exit {code}: {err[-300:]!r}"
    assert len(errors) == 1 and errors[0] == lines[-1], f"not one error line: {err[-400:]!r}"
    assert damaged.name in errors[0], f"does not name {damaged.name}: {errors[0]!r}"
    assert snapshot(copy) == before, f"refused, but changed files in {copy}"
    return errors[0]
