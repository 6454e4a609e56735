"""A simulated accelerator: the distillation's device code paths checked on a machine without a GPU.

No GPU has ever run these tests, so a CUDA run's device bugs would show only on a user's first GPU run. Here
the run's device is ``SIM`` (``torch.device("meta")``, which ``pick_device`` is patched to accept): every
tensor the code creates on it or moves to it becomes an :class:`OnDevice` wrapper that reports that device
but holds a real CPU tensor, so the run computes, checkpoints, resumes and evaluates to the end with the
CPU's kernels (and numbers). :class:`SimDevice` (a ``TorchDispatchMode``) sees every aten op and raises
:class:`DeviceMixError` where CUDA would refuse the op:

- a device tensor combined with a CPU tensor of one or more dimensions (0-dim CPU tensors pass, as CUDA
  takes them as scalars), except the ops that move data (``copy_``, ``to``) and indexing a device tensor
  with CPU indices (``x[idx]``, ``x[idx] = v``), which CUDA allows;
- a random draw for a device tensor from a CPU ``torch.Generator`` (CUDA: "Expected a 'cuda' device type
  for generator");
- ``.numpy()`` of a device tensor.

Random draws for device tensors from the device's own global stream (no generator) are recorded in
``draws``: on CUDA they come from the CUDA generator, so a GPU run would draw other numbers than the CPU.

What it cannot see: kernel differences (TF32 convolutions, non-deterministic atomics), memory, speed, and
CUDA's own state (``torch.cuda.is_available()`` stays False); third-party code that builds on the meta device
itself (transformers' model loading) must run before entering (the text encoder is cached once loaded).
Cost: one Python call per aten op; measured 2.9x the plain CPU time of the ten tiny method runs (1.37 s ->
3.96 s, 1 thread).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

SIM = torch.device("meta")
aten = torch.ops.aten
MOVES = {aten._to_copy.default, aten.copy_.default, aten._local_scalar_dense.default}
INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class DeviceMixError(RuntimeError):
    """What CUDA would raise: tensors on different devices, or a CPU generator for device tensors."""


class OnDevice(torch.Tensor):
    """A tensor on ``SIM`` whose values live in the CPU tensor ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                device=SIM, requires_grad=False)
        r.elem = elem
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {}, None)

    def tolist(self):  # CUDA copies to the host (plain wrapper subclasses refuse)
        return self.elem.tolist()

    def numpy(self, *args, **kwargs):
        raise DeviceMixError(f"can't convert {SIM} device type tensor to numpy. Use Tensor.cpu() first")


def _is_sim(device) -> bool:
    return device is not None and torch.device(device).type == SIM.type


def _check(func, flat: list, on_device: bool) -> None:
    """Raise where CUDA would (module docstring)."""
    stray = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, OnDevice) and _is_sim(a.device)]
    if stray:  # made outside the simulation: its values are lost (a constructor SimDevice does not patch)
        raise DeviceMixError(f"{func}: a {SIM} tensor of shape {tuple(stray[0].shape)} holds no values")
    cpu = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, OnDevice) and a.dim() > 0]
    ours = [a for a in flat if isinstance(a, OnDevice)]
    if ours and cpu and func not in MOVES:
        self_on = isinstance(flat[0], OnDevice)
        only_indices = func in INDEXING and self_on and all(a.dtype in (torch.long, torch.int, torch.bool)
                                                            for a in cpu)
        if not only_indices:
            raise DeviceMixError(f"{func}: Expected all tensors to be on the same device, but found at least two "
                                 f"devices, {SIM} and cpu (CPU shapes {[tuple(a.shape) for a in cpu]})")
    gens = [a for a in flat if isinstance(a, torch.Generator)]
    if on_device and any(g.device.type == "cpu" for g in gens):
        raise DeviceMixError(f"{func}: Expected a '{SIM.type}' device type for generator but found 'cpu'")


def dispatch(func, args, kwargs, mode: SimDevice | None):
    """Run ``func`` on the CPU values; its tensor results are on the device when an input was or it was asked
    for there (``device=`` of a factory or ``to``)."""
    flat, _ = tree_flatten((args, kwargs))
    asked = kwargs.get("device")
    on_device = _is_sim(asked) or (asked is None and any(isinstance(a, OnDevice) for a in flat))
    _check(func, flat, on_device)
    if on_device and mode is not None:
        mode.ops += 1
    if on_device and mode is not None and torch.Tag.nondeterministic_seeded in func.tags \
            and not any(isinstance(a, torch.Generator) for a in flat):
        mode.draws.append(str(func))
    if _is_sim(asked):
        kwargs = {**kwargs, "device": torch.device("cpu")}
    wrappers = {}

    def unwrap(a):
        if isinstance(a, OnDevice):
            wrappers[id(a.elem)] = a
            return a.elem
        return a

    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    if torch.Tag.inplace_view in func.tags and isinstance(args[0], OnDevice):
        with torch._C._DisableTorchDispatch():  # the wrapper's own sizes follow (the meta kernel, no data)
            func(*args, **kwargs)

    def wrap(o):
        if not isinstance(o, torch.Tensor) or isinstance(o, OnDevice):
            return o
        if id(o) in wrappers:  # an in-place op returns its own input
            return wrappers[id(o)]
        return OnDevice(o) if on_device else o

    return tree_map(wrap, out)


class SimDevice(TorchDispatchMode):
    """Routes every aten op through :func:`dispatch`; ``draws``: the device-RNG draws seen (module docstring).

    ``torch.tensor(data, device=SIM)`` (and ``as_tensor``, ``asarray``) make their meta tensor without an aten
    op this mode would see, and without the data: while the mode is active they build on the CPU and move."""

    CONSTRUCTORS = ("tensor", "as_tensor", "asarray")
    device, Error, Tensor = SIM, DeviceMixError, OnDevice  # for the tests (conftest is no importable module)

    def __init__(self):
        super().__init__()
        self.draws: list[str] = []
        self.ops = 0  # aten ops run on the device (a test that never reached it would see 0)
        self._saved: dict = {}
        self._warnings = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {}, self)

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()  # load_state_dict into a meta parameter warns that it copies nothing; ours do
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        for name in self.CONSTRUCTORS:
            self._saved[name] = getattr(torch, name)
            setattr(torch, name, _built_then_moved(self._saved[name]))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(torch, name, real)
        self._warnings.__exit__(*exc)
        return super().__exit__(*exc)


def _built_then_moved(real):
    def make(*args, device=None, **kwargs):
        if not _is_sim(device):
            return real(*args, device=device, **kwargs)
        return real(*args, **kwargs).to(SIM)
    return make


def _pick(real):
    def pick(device=None):
        return SIM if _is_sim(device) else real(device)
    return pick


@pytest.fixture
def sim_device(monkeypatch):
    """A :class:`SimDevice` to enter (``with sim_device: distill(..., device=sim_device.device)``), with
    ``pick_device`` accepting that device where the distillation and its evaluation call it."""
    from modelatlas.distill import api, evaluate, nets

    pick = _pick(nets.pick_device)
    for module in (api, evaluate, nets):
        monkeypatch.setattr(module, "pick_device", pick)
    return SimDevice()


SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "device_check.py"


@pytest.fixture(scope="module")
def tiny():
    """bench/device_check.py's tiny configs: what a lent GPU will run is what is simulated here."""
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))  # its first import, bench/short_spin.py
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module._config
