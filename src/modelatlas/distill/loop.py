"""The outer loop shared by every distillation method: seeding, progress, resumable checkpoints.

A method supplies ``step(iteration, generator) -> loss`` that performs one outer iteration (sample a network,
compute the matching loss, step S) and the objects whose state must survive a crash (the synthetic set,
its optimisers, any method state), each with ``state_dict()``/``load_state_dict()``. :class:`OuterLoop`

- re-seeds torch's global CPU generator and hands a fresh generator to every iteration from
  ``derive_seed(seed, it)``, so iteration ``it`` draws the same numbers whether the run was interrupted or not;
  a device's own stream (CUDA's) is not touched: no method draws from it (tests/distill/test_device.py), so
  reseeding it made no resume more exact, and it reset the caller's stream (``fork_rng(devices=[])`` restores
  only the CPU's);
- shows a progress bar with the current loss (``bar.set_postfix(loss=...)``);
- on Ctrl-C (with a ``checkpoint_dir``) finishes the iteration in progress and checkpoints it before it stops
  (:mod:`modelatlas.distill.interrupt`; a second Ctrl-C stops at once);
- every ``checkpoint_every`` iterations (and at the end) writes ``checkpoint_dir/ckpt-<it>.safetensors``
  (every tensor of every state: synthetic set, optimiser, CPU RNG states) and then ``checkpoint.json``
  (iteration, loss history, non-tensor state, the device type it ran on), both atomically; ``checkpoint.json``
  is written last and is the commit point, so a crash at any moment leaves the previous complete checkpoint;
  with a ``clock`` it also records the run's wall time so far, which a resumed run adds to its own
  (:func:`saved_wall_time`);
- with ``resume=True`` loads the checkpoint (CPU tensors, which each state's ``load_state_dict`` moves to its
  own device) and continues at the next iteration: a run interrupted and resumed on the same device yields
  exactly the tensors of an uninterrupted run; on another device type (checkpointed on "cuda", resumed on
  "cpu") it goes on with a :class:`~modelatlas.errors.DeviceChangeWarning`, as the rest of the run rounds as
  the new device does (the random draws are the same: all are made on the CPU).

Checkpoint cost: O(size of the states) per save.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from modelatlas.atomic import atomic_save_tensors, atomic_write_json, read_tensors
from modelatlas.digests import check_file_sha256, file_sha256
from modelatlas.distill.interrupt import deferred_interrupt
from modelatlas.errors import CheckpointError, DeviceChangeWarning, DivergedError
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import derive_seed, torch_generator
from modelatlas.weights.base import error_line

CHECKPOINT_JSON = "checkpoint.json"


def read_json(path: str | Path, hint: str = "delete it to start over") -> dict:
    """The JSON object in ``path``; a corrupt file raises :class:`CheckpointError` naming it (and ``hint``)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"is not valid JSON ({getattr(e, 'msg', e)}); {hint}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"is not a JSON object; {hint}")
    return obj


def read_checkpoint(checkpoint_dir: str | Path) -> dict | None:
    """The ``checkpoint.json`` of ``checkpoint_dir`` (a corrupt one raises :class:`CheckpointError`), None
    without one: read once per run and passed down (to :func:`saved_wall_time`, the loop, a resume's
    checks)."""
    path = Path(checkpoint_dir) / CHECKPOINT_JSON  # a folder there is named, not taken for no checkpoint
    return read_json(path) if path.exists() else None


RESTART = "delete the checkpoint folder to restart"
DIGESTED = ("iteration", "iterations", "seed", "tensors", "losses", "states")  # what a resume continues from


def _plain(obj: Any) -> Any:
    """JSON fallback of a checkpoint's non-tensor state: NumPy scalars and arrays as lists, anything else as text."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


def checkpoint_digests(tensor_path: Path, meta: Mapping[str, Any]) -> dict[str, str]:
    """SHA-256 of the tensor file's bytes and of the JSON fields a resume continues from (:data:`DIGESTED`),
    recorded in checkpoint.json: a checkpoint damaged on disk or edited since is refused, never continued
    silently from other values (a flipped bit of the images, an RNG state edited). O(checkpoint bytes)."""
    return {"tensors_sha256": file_sha256(tensor_path), "states_sha256": _fields_sha256(meta)}


def _fields_sha256(meta: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps([meta.get(k) for k in DIGESTED], sort_keys=True).encode()).hexdigest()


def check_meta(meta: Mapping[str, Any], meta_path: Path) -> None:
    """Refuse a checkpoint.json whose keys are missing or of another type, or whose iteration and losses differ."""
    kinds = {"iteration": (int, "an integer"), "tensors": (str, "a file name"), "states": (dict, "an object"),
             "losses": (list, "a list")}
    bad = next((k for k, (kind, _) in kinds.items() if not isinstance(meta.get(k), kind)), None)
    if bad is not None:  # a hand-edited or foreign file: not a KeyError traceback
        raise CheckpointError(meta_path, f"key {bad!r} is missing or not {kinds[bad][1]}; {RESTART}")
    it, losses = meta["iteration"], meta["losses"]
    if it < 0 or len(losses) != it or not all(isinstance(v, (int, float)) for v in losses):  # hand edits
        raise CheckpointError(meta_path, f"iteration {it} does not match its {len(losses)} losses (numbers); {RESTART}")


def check_states_digest(meta: Mapping[str, Any], meta_path: Path) -> None:
    """Refuse a checkpoint.json whose resumed fields differ from those it was saved with (its ``states_sha256``;
    a checkpoint of before session 40 has none: not checked)."""
    if "states_sha256" in meta and meta["states_sha256"] != _fields_sha256(meta):
        raise CheckpointError(meta_path, "its saved state differs from the one it was written with (damaged or "
                                         f"edited since: its states_sha256 does not match); {RESTART}")


def check_tensors_digest(meta: Mapping[str, Any], path: Path) -> Path:
    """``path`` (the checkpoint's tensor file), refused when it is not the file checkpoint.json was saved with
    (its ``tensors_sha256``; none in a checkpoint of before session 40: not checked)."""
    check_file_sha256(path, meta.get("tensors_sha256"), CHECKPOINT_JSON, RESTART)  # (missing: read_tensors names it)
    return path


def saved_wall_time(checkpoint: Mapping[str, Any] | None) -> float:
    """The wall time a run had spent by its last ``checkpoint`` (:func:`read_checkpoint`; 0 without one)."""
    wall = (checkpoint or {}).get("wall_time_s")
    return float(wall) if isinstance(wall, (int, float)) and wall >= 0 else 0.0


class Stateful(Protocol):
    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...


def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by ``{"__tensor__": key}`` and collect it in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, Mapping):
        return {"__keys__": [[_key_json(k), flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    return obj


def unflatten_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__keys__" in obj:
        return {_key_back(k): unflatten_state(v, tensors) for k, v in obj["__keys__"]}
    if isinstance(obj, dict) and "__list__" in obj:
        items = [unflatten_state(v, tensors) for v in obj["__list__"]]
        return tuple(items) if obj.get("tuple") else items
    return obj


def _key_json(k: Any) -> Any:
    return {"int": k} if isinstance(k, int) else k


def _key_back(k: Any) -> Any:
    return k["int"] if isinstance(k, dict) else k


class RNGState:
    """Python, NumPy and torch CPU global RNG states as a :class:`Stateful`.

    Not CUDA's: no method draws from a device's own stream (tests/distill/test_device.py), so a restored CUDA
    state would go unused (it was overwritten unused when every iteration reseeded CUDA's stream too). Keeping
    it read the states of every visible GPU, which started CUDA in a ``--device cpu`` run (a busy GPU failed its
    first checkpoint), and a resume with fewer GPUs visible was refused. A "cuda" entry of an older checkpoint
    is ignored."""

    def state_dict(self) -> dict:
        return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                "python_pos": random.getstate()[2], "numpy": np.random.get_state()[1].astype(np.int64).tolist(),
                "numpy_pos": int(np.random.get_state()[2])}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate((3, tuple(state["python"]), state["python_pos"]))
        np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))


class OuterLoop:
    """Runs ``iterations`` outer steps with seeding, progress and resumable checkpoints (module docstring)."""

    def __init__(self, iterations: int, seed: int = 0, progress: Progress | None = None,
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int = 50, resume: bool = False,
                 desc: str = "distill", clock: Callable[[], float] | None = None,
                 checkpoint: Mapping[str, Any] | None = None, device: str | torch.device = "cpu"):
        """``checkpoint``: ``checkpoint_dir``'s checkpoint.json as the caller read it for a resume
        (:func:`read_checkpoint`); None: read it here. ``device``: the run's, whose type ("cuda", "cpu") the
        checkpoint records."""
        self.checkpoint, self.device = checkpoint, torch.device(device).type
        self.devices = [self.device]  # the device types the run's iterations ran on, in order (resume adds)
        self.iterations, self.seed, self.progress, self.desc = int(iterations), int(seed), progress, desc
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = max(int(checkpoint_every), 1)
        self.resume, self.clock = resume, clock
        self.losses: list[float] = []
        self.start = 0
        self.saved = 0  # iterations done at the last checkpoint written or resumed from (0: none)

    def run(self, step: Callable[[int, torch.Generator], float], states: Mapping[str, Stateful]) -> list[float]:
        """Call ``step`` for every remaining iteration; returns the loss history (all iterations)."""
        states = {**states, "rng": RNGState()}
        if self.resume:
            self._load(states)
        bar = resolve(self.progress)(range(self.start, self.iterations), total=self.iterations - self.start,
                                     desc=self.desc)
        # the per-iteration seeding leaves the caller's CPU stream alone; a Ctrl-C ends the iteration first
        with torch.random.fork_rng(devices=[]), deferred_interrupt(self.checkpoint_dir is not None) as stopping:
            for it in bar:
                # the CPU's generator only (torch.manual_seed's CPU part): see the module docstring
                torch.random.default_generator.manual_seed(derive_seed(self.seed, "iteration", it))
                loss = float(step(it, torch_generator(derive_seed(self.seed, "generator", it))))
                self._check_finite(loss, it)
                self.losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4g}")
                done, stop = it + 1, stopping()
                if self.checkpoint_dir is not None and (done % self.checkpoint_every == 0 or done == self.iterations
                                                        or stop):
                    self.save(states, done)
                if stop:
                    raise KeyboardInterrupt
        return self.losses

    def _check_finite(self, loss: float, it: int) -> None:
        """Stop at the first NaN / infinite loss: the synthetic set is then NaN too, and was evaluated (~chance)
        and saved as a result. The last checkpoint, from before it, is kept."""
        if math.isfinite(loss):
            return
        kept = (f"the checkpoint of iteration {self.saved} is kept, but resuming repeats the same steps"
                if self.saved else "nothing was kept")  # a resumed run's own checkpoint may be off the every-N grid
        raise DivergedError(f"the distillation diverged at iteration {it + 1} of {self.iterations}: its loss is "
                            f"{loss} ({kept}); run it again with smaller learning rates (--set lr_img=..., "
                            "and inner_lr / lr_label / lr_init / lr_lr where the method has them)")

    def save(self, states: Mapping[str, Stateful], done: int) -> None:
        """Write the checkpoint after ``done`` completed iterations (tensors first, then the JSON)."""
        assert self.checkpoint_dir is not None
        tensors: dict[str, torch.Tensor] = {}
        flat = {name: flatten_state(s.state_dict(), name, tensors) for name, s in states.items()}
        tensor_file = f"ckpt-{done}.safetensors"
        atomic_save_tensors(self.checkpoint_dir / tensor_file, tensors)
        meta = {"iteration": done, "iterations": self.iterations, "seed": self.seed, "tensors": tensor_file,
                "losses": self.losses, "states": flat, "wall_time_s": None if self.clock is None else self.clock(),
                "device": self.device, "devices": self.devices}
        meta = json.loads(json.dumps(meta, default=_plain))  # as a resume reads it back, for its digest
        atomic_write_json(self.checkpoint_dir / CHECKPOINT_JSON,
                          {**meta, **checkpoint_digests(self.checkpoint_dir / tensor_file, meta)})
        for old in self.checkpoint_dir.glob("ckpt-*.safetensors"):
            if old.name != tensor_file:
                old.unlink(missing_ok=True)
        self.saved = done

    def _load(self, states: Mapping[str, Stateful]) -> None:
        if self.checkpoint_dir is None:
            raise CheckpointError(".", "resume=True needs a checkpoint_dir")
        meta_path = self.checkpoint_dir / CHECKPOINT_JSON
        meta = self.checkpoint if self.checkpoint is not None else read_checkpoint(self.checkpoint_dir)
        if meta is None:
            return  # nothing saved yet: start from scratch
        check_meta(meta, meta_path)
        if meta.get("seed") != self.seed:
            raise CheckpointError(meta_path, f"was written with seed {meta.get('seed')}, not {self.seed}; "
                                             "use the same --seed or a new output folder")
        if int(meta["iteration"]) > self.iterations:  # else the longer run's state would pass for this one
            raise CheckpointError(meta_path, f"has {meta['iteration']} iterations done, more than "
                                             f"iterations={self.iterations}; resume with iterations >= "
                                             f"{meta['iteration']} or use a new output folder")
        check_states_digest(meta, meta_path)
        tensors = read_tensors(check_tensors_digest(meta, self.checkpoint_dir / meta["tensors"]), RESTART)
        for name, s in states.items():
            if name not in meta["states"]:
                raise CheckpointError(meta_path, f"has no state {name!r}; it was written by another method")
            try:
                s.load_state_dict(unflatten_state(meta["states"][name], tensors))
            except (RuntimeError, ValueError, KeyError, IndexError, TypeError, OverflowError) as e:  # another --ipc
                raise CheckpointError(meta_path, f"state {name!r} does not fit this run ({error_line(e)}); it was written "
                                                 "with other settings (ipc, config): resume with those, or use a "
                                                 "new output folder") from e
        self.start = self.saved = int(meta["iteration"])
        self.losses = list(meta["losses"])
        self.devices = device_history(meta, self.device)
        self._warn_device_change(meta, meta_path)

    def _warn_device_change(self, meta: Mapping[str, Any], meta_path: Path) -> None:
        """Warn when iterations are left to run on another device type than the checkpoint's (a checkpoint of
        before session 36 records none: no warning). Not refused: the states load on any device."""
        saved = meta.get("device")
        if isinstance(saved, str) and saved != self.device and self.start < self.iterations:
            warnings.warn(f"{meta_path}: checkpointed on {saved}, resumed on {self.device}; the run goes on, but "
                          f"its remaining iterations round as {self.device} does, so the set is not bit-identical "
                          f"to one finished on {saved}", DeviceChangeWarning, stacklevel=3)


def device_history(meta: Mapping[str, Any] | None, device: str) -> list[str]:
    """The device types a run resumed from checkpoint ``meta`` ran on, in order, then ``device`` where it differs
    from the last (an older checkpoint records its last device only, or none)."""
    meta = meta or {}
    saved = meta.get("devices") if isinstance(meta.get("devices"), list) else [meta.get("device")]
    earlier = [d for d in saved if isinstance(d, str)]
    return earlier + ([device] if not earlier or earlier[-1] != device else [])
