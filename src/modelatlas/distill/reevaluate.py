"""Re-evaluate a saved result folder (``atlas distill eval``): its set, its saved transform and protocol,
checked against the data it is scored on. Time: the evaluation's (N networks trained from scratch)."""

from __future__ import annotations

from pathlib import Path

from modelatlas.atomic import check_out_folder
from modelatlas.config_types import misfit
from modelatlas.data import available_datasets, load_dataset
from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.api import apply_transform
from modelatlas.distill.evaluate import PROTOCOL_FLOATS, PROTOCOL_INTS, EvalProtocol, evaluate_synthetic
from modelatlas.distill.result import RESULT_JSON, load_result, update_result
from modelatlas.distill.run_check import absolute_root
from modelatlas.distill.splits import check_fits, check_test_split
from modelatlas.errors import CheckpointError, ConfigError, DatasetNotFoundError
from modelatlas.progress import Progress
from modelatlas.seeding import SEED_RANGE, is_seed


def evaluate_result(folder: str | Path, eval_nets: int | None = None, eval_epochs: int | None = None,
                    seed: int | None = None, dataset_test: ArrayDataset | None = None,
                    progress: Progress | None = None, device: str | None = None, save: bool = True,
                    dataset_kwargs: dict | None = None) -> dict:
    """Re-evaluate a saved result folder on its dataset's test split (with its saved transform); stores the
    new evaluation under ``reevaluation`` in ``result.json`` when ``save``. ``dataset_kwargs`` override the
    saved ones (e.g. ``root``: the data now lives elsewhere). Returns the evaluation dict."""
    if seed is not None and not is_seed(seed):
        raise ConfigError(f"seed must be {SEED_RANGE}, got {seed!r}")
    syn, tf, info = load_result(folder)
    if not isinstance(info.get("dataset"), str):
        raise CheckpointError(Path(folder) / RESULT_JSON, "has no 'dataset' name (edited, or not a result.json of "
                                                          "`atlas distill`); run the distillation again")
    lacks = next((k for k in ("method", "evaluation") if k not in info), None)  # another program's result.json
    if lacks is not None:  # was scored under the default protocol, and its file given a 'reevaluation'
        raise CheckpointError(Path(folder) / RESULT_JSON, f"has no {lacks!r} (not a result.json of `atlas distill`: "
                                                          "another program's, or edited); run the distillation again")
    if save:  # the evaluation is stored in the folder: one that takes no file fails now, not after training
        check_out_folder(folder, f"the result folder {folder}", "copy it somewhere writable and evaluate the copy")
    proto, seed, saved_kw = _saved_settings(Path(folder) / RESULT_JSON, info, seed)
    kw = {**saved_kw, **absolute_root(dataset_kwargs)}
    test = check_test_split(dataset_test or _load_test(folder, info["dataset"], kw, dataset_kwargs))
    check_fits(folder, syn, test)
    if eval_nets is not None:
        proto.num_nets = eval_nets
    if eval_epochs is not None:
        proto.epochs = eval_epochs
    EvalProtocol.__post_init__(proto)
    ev = evaluate_synthetic(syn, apply_transform(tf, test), proto, seed=seed,
                            progress=progress, device=device).to_dict()
    if save:
        update_result(folder, reevaluation=ev)
    return ev


def _load_test(folder: str | Path, dataset: str, kw: dict, given: dict | None) -> ArrayDataset:
    """The test split; data missing at the root saved in result.json (moved since the run) says how to
    point at its new place, which a bare 'is not a folder' for a path the user never typed did not; a set
    distilled from data given in Python (an ArrayDataset of no registered name) says how to score it there."""
    if dataset not in available_datasets():
        raise ConfigError(f"{Path(folder) / RESULT_JSON}: dataset {dataset!r} is no registered dataset ("
                          f"{', '.join(sorted(available_datasets()))}): the set was distilled from data given in "
                          f"Python; score it there: evaluate_result({str(folder)!r}, dataset_test=<its test split>)")
    try:
        return load_dataset(dataset, "test", **kw)
    except DatasetNotFoundError as e:
        if "root" not in kw or (given or {}).get("root"):
            raise
        raise DatasetNotFoundError(f"{e} ({folder} was distilled from it; result.json dataset_kwargs.root): "
                                   "if the data moved, pass its new folder with --data-root "
                                   "(dataset_kwargs={'root': ...})") from None


def _saved_settings(path: Path, info: dict, seed: int | None) -> tuple[EvalProtocol, int, dict]:
    """(protocol, seed (``seed`` when given), dataset kwargs) saved in result.json ``path``, checked: a hand
    edit fails here naming the file and the key, not deep in training with a TypeError."""
    ev = info.get("evaluation", {})
    old = ev.get("protocol", {}) if isinstance(ev, dict) else None
    if not isinstance(old, dict):
        raise CheckpointError(path, "evaluation.protocol must be an object; run the distillation again")
    kw = {k: v for k, v in old.items() if k in EvalProtocol.__dataclass_fields__}
    # None and the other fields are left to EvalProtocol (its message, under "evaluation.protocol: ")
    numbers = {k: v for k, v in kw.items() if v is not None and k in PROTOCOL_INTS + PROTOCOL_FLOATS}
    bad = misfit(numbers, EvalProtocol)
    if bad is not None:
        raise CheckpointError(path, f"evaluation.protocol.{bad.key} must be a number"
                                    f"{' (integer)' * (int in bad.allowed)}, got {bad.value!r}")
    try:
        proto = EvalProtocol(**kw)
    except ConfigError as e:
        raise CheckpointError(path, f"evaluation.protocol: {e}") from None
    seed, data_kw = info.get("seed", 0) if seed is None else seed, info.get("dataset_kwargs") or {}
    if not is_seed(seed):
        raise CheckpointError(path, f"seed must be {SEED_RANGE}, got {seed!r}; or pass --seed")
    if not isinstance(data_kw, dict):
        raise CheckpointError(path, f"dataset_kwargs must be an object, got {data_kw!r}")
    return proto, seed, data_kw
