"""What a distillation run records about itself (``checkpoint/run.json``) and the check that a resume continues
the same run: same method, data, ipc, transform, starting set and config, less the fields a resume may change.
Every check is O(settings) but :func:`digest`, O(starting set)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from modelatlas.atomic import atomic_write_json, peek_json_object
from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.loop import CHECKPOINT_JSON, read_json
from modelatlas.distill.result import RESULT_JSON
from modelatlas.distill.synthetic import SyntheticSet
from modelatlas.errors import CheckpointError, ConfigError


def run_record(method: str, train: ArrayDataset, ipc: int, tf, dataset_kwargs: dict, init_from: str | None,
                init: SyntheticSet | None, cfg, seed: int) -> dict:
    """The settings a resume is checked against (``run.json``). The seed too: checkpoint.json has it, but
    ``random`` and ``herding`` write none (a resume with another seed redrew their finished set)."""
    return {"method": method, "dataset": train.name, "ipc": ipc, "seed": seed, "transform": tf.kind,
            "dataset_kwargs": dataset_kwargs, "init_from": init_from, "init_digest": digest(init),
            "config": cfg.to_dict(), "classes": train.classes}


def has_progress(out: Path) -> bool:
    """Whether ``out`` holds a run's checkpoint or its finished result (what its run.json describes)."""
    return (out / "checkpoint" / CHECKPOINT_JSON).is_file() or (out / RESULT_JSON).is_file()


def another_commands(path: Path) -> bool:
    """Whether the run.json at ``path`` is another command's: ``atlas attribute`` keeps its interrupted state
    in ``OUT/checkpoint/run.json`` too ({"settings", ...}, no "method"), which a distillation into that folder
    replaced. Unreadable or another shape counts as a distillation's, so its resume says what is wrong."""
    data = peek_json_object(path)
    return data is not None and "settings" in data and "method" not in data


def foreign_result(path: Path) -> bool:
    """Whether the result.json at ``path`` is another program's: a JSON object naming no ``method``, which every
    distillation's names (it was taken for a finished result, and --resume sent to `atlas distill eval`, which
    then missed the set). Unreadable counts as a distillation's: a damaged one is replaced by its resume."""
    data = peek_json_object(path)
    return data is not None and "method" not in data


def absolute_root(dataset_kwargs: dict | None) -> dict:
    """``dataset_kwargs`` with a ``root`` made absolute (a result stays usable from another working folder)."""
    kw = dict(dataset_kwargs or {})
    if kw.get("root") is not None:
        kw["root"] = str(Path(kw["root"]).expanduser().resolve())
    return kw


RUN_JSON = "run.json"
# a resumed run may be extended, checkpoint more often, score its real batch in smaller chunks (the same
# gradient: the fix for a run that ran out of memory) or keep its cache elsewhere (experts, pools, teachers are
# fixed by the data, their settings and the seed); a field missing from an older run.json is one of these
_MAY_CHANGE = ("iterations", "checkpoint_every", "real_chunk", "cache_dir")


# settings compared first, so a resume names the most telling difference (another method, not its fields)
_FIRST = ("method", "dataset", "ipc", "seed", "transform", "dataset_kwargs", "init_from", "init_digest")


def check_run(path: Path, resume: bool, run: dict, net: dict | None = None) -> None:
    """On resume, refuse a checkpoint written by another run (another dataset of the same shape would load
    without complaint); otherwise record this run beside its checkpoints. Values are compared resolved (an
    explicit ``identity`` transform or the default width equal their defaults; ``net``: the default net spec
    for this input, which a saved or given width/depth of None stands for; a starting set by its content, so
    its folder may move; the class names, which an image folder takes from its subfolders). Checkpoints
    without the file (older versions) are resumed unchecked; a run.json with neither a checkpoint nor a result
    beside it (a start stopped before its first checkpoint) is replaced."""
    if not (resume and path.is_file() and has_progress(path.parent.parent)):  # (alone: a start that never checkpointed)
        atomic_write_json(path, run)
        return
    saved_run = _checked_types(path, read_json(path, "delete the checkpoint folder to start over"))
    saved, now = _identity(saved_run, net), _identity(json.loads(json.dumps(run)), net)
    if saved["seed"] is None:  # an older run.json: its checkpoint.json's seed is checked by the loop
        now["seed"] = None
    rest = sorted((set(saved) | set(now)) - set(_FIRST), key=lambda k: (k.startswith("config."), k))
    for k in (*_FIRST, *rest):
        if saved.get(k) != now.get(k) and k == "init_digest":
            raise _other_start(path, saved_run, run)
        if saved.get(k) != now.get(k):
            raise ConfigError(f"{path}: the checkpointed run used {_setting(k, saved, now)}; resume with the same "
                              "settings or use a new --out")
    _check_classes(path, saved_run.get("classes"), run["classes"])


def _setting(key: str, saved: dict, now: dict) -> str:
    """'KEY OLD, not NEW'; a data root named by its flag (it read 'dataset_kwargs {'root': ...}')."""
    was, got = saved.get(key), now.get(key)
    if key == "dataset_kwargs" and set(was or {}) | set(got or {}) == {"root"}:
        was, got = (was or {}).get("root"), (got or {}).get("root")
        return f"--data-root {was or '(none)'}, not {got or '(none)'} (dataset_kwargs root=)"
    return f"{key} {was!r}, not {got!r}"


def _other_start(path: Path, saved: dict, now: dict) -> ConfigError:
    """The refusal of a resume from another starting set (--init-from) than the checkpointed run's, naming the
    flag and both folders (it named two SHA-256 digests, or "not None" for a missing --init-from)."""
    was = f"the set of {saved.get('init_from')} (--init-from)" if saved.get("init_digest") else "real images"
    if now.get("init_digest") is None:
        got = "real images"
    else:
        got = f"the set of {now.get('init_from')}" + (", whose images differ" if saved.get("init_digest") else "")
    fix = (f"pass --init-from {saved.get('init_from')} (or the folder it moved to)" if saved.get("init_digest")
           else "resume without --init-from")
    return ConfigError(f"{path}: the checkpointed run started from {was}, this one from {got}; {fix}, or use a "
                       "new --out")


_RUN_TYPES = {"config": (dict, "an object"), "classes": (list, "a list"), "dataset_kwargs": (dict, "an object"),
              "init_from": (str, "a folder name")}


def _checked_types(path: Path, saved: dict) -> dict:
    """``saved`` (run.json), refused naming the key when one is of another type (a hand edit: an
    AttributeError or TypeError in the comparison)."""
    for key, (kind, what) in _RUN_TYPES.items():  # absent in older versions; only init_from may be null
        if key in saved and not isinstance(saved[key], kind) and not (saved[key] is None and key == "init_from"):
            raise CheckpointError(path, f"{key} must be {what}, got {saved[key]!r}; delete the checkpoint folder "
                                        "to start over")
    return saved


def _check_classes(path: Path, saved: list | None, now: list[str]) -> None:
    """Refuse other class names (an image folder's class renamed, or one swapped for another): the checkpointed
    images would go on under other labels. A run.json without them (older versions) is not checked."""
    if saved is None or saved == now:
        return
    i = next((i for i, (a, b) in enumerate(zip(saved, now)) if a != b), min(len(saved), len(now)))
    was, got = (repr(names[i]) if i < len(names) else "none" for names in (saved, now))
    raise ConfigError(f"{path}: the checkpointed run's class {i} was {was}, the data's is {got} ({len(saved)} "
                      f"classes then, {len(now)} now); resume on the same data or use a new --out")


def _identity(run: dict, net: dict | None) -> dict:
    """A run's settings as flat keys (``config.lr_img``), resolved, less those a resumed run may change."""
    config = {f"config.{k}": v for k, v in run.get("config", {}).items() if k not in _MAY_CHANGE}
    for k in ("width", "depth"):  # None is the default net's value
        if net is not None and config.get(f"config.{k}", 0) is None:
            config[f"config.{k}"] = net[k]
    top = {k: v for k, v in run.items() if k not in ("config", "classes")}  # classes: see _check_classes
    top.setdefault("seed", None)  # absent in older versions: not compared (check_run)
    if top.get("init_digest") is not None:  # the starting set is known by its content: its folder may move
        top.pop("init_from", None)
    top["transform"] = top.get("transform") or "identity"
    top["dataset_kwargs"] = absolute_root(top.get("dataset_kwargs"))
    if top.get("init_from") is not None:
        top["init_from"] = str(Path(top["init_from"]).resolve())
    return {**top, **config}


def digest(syn: SyntheticSet | None) -> str | None:
    """A SHA-256 of a starting set's images, classes and label logits (None without one). Time O(set size)."""
    if syn is None:
        return None
    h = hashlib.sha256()
    for t in (syn.images, syn.classes, syn.label_logits):
        if t is not None:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


