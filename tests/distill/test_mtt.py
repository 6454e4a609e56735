import json
from pathlib import Path

import pytest
import torch

from modelatlas.data import load_dataset
from modelatlas.distill import distill
from modelatlas.distill.methods import get
from modelatlas.distill.methods.mtt import buffer as B
from modelatlas.distill.methods.mtt.method import trajectory_loss
from modelatlas.distill.nets import make_net
from modelatlas.distill.synthetic import SyntheticSet
from modelatlas.errors import ConfigError


def make_cfg(tmp_path, **kw):
    return {"iterations": 3, "num_experts": 2, "expert_epochs": 3, "max_start_epoch": 1, "syn_steps": 2,
            "width": 8, "checkpoint_every": 1, "cache_dir": str(tmp_path / "cache"), **kw}


def test_buffer_is_cached_and_reused(tmp_path, monkeypatch):
    tr = load_dataset("digits", "train")
    cfg = get("mtt").make_config(make_cfg(tmp_path))
    buf, path = B.load_or_train(tr, cfg, 0, torch.device("cpu"), None)
    assert path.is_file() and buf.shape[:2] == (2, 4)  # (experts, epochs + 1, P)
    assert not torch.equal(buf[0, 0], buf[0, -1]) and not torch.equal(buf[0, 0], buf[1, 0])

    def boom(*a, **k):
        raise AssertionError("retrained")
    monkeypatch.setattr(B, "train_expert", boom)
    again, path2 = B.load_or_train(tr, cfg, 0, torch.device("cpu"), None)
    assert path2 == path and torch.equal(again, buf)
    other = get("mtt").make_config(make_cfg(tmp_path, lr_teacher=0.02))
    assert B.buffer_key(tr, other, 0) != B.buffer_key(tr, cfg, 0)


def test_trajectory_loss_is_one_at_zero_lr_and_reaches_images():
    net = make_net("convnet", (1, 8, 8), 2, width=4, depth=1, seed=0)
    shapes = {k: v.shape for k, v in net.named_parameters()}
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    target = start + 0.1
    syn = SyntheticSet(torch.rand(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]), 2, lr=0.0)
    gen = torch.Generator().manual_seed(0)
    loss = trajectory_loss(net, shapes, start, target, syn, 2, 4, gen, None)
    assert float(loss.detach()) == pytest.approx(1.0)
    syn.lr.data.fill_(0.05)
    loss = trajectory_loss(net, shapes, start, target, syn, 2, 4, gen, None)
    loss.backward()
    assert syn.images.grad.abs().sum() > 0 and syn.lr.grad is not None


def test_resume_equals_straight_run(tmp_path):
    tr = load_dataset("digits", "train")
    straight = distill("mtt", tr, 1, make_cfg(tmp_path), seed=1)
    assert straight.lr is not None and float(straight.lr.detach()) >= 1e-4
    distill("mtt", tr, 1, make_cfg(tmp_path, iterations=2), seed=1, checkpoint_dir=tmp_path / "ck")
    resumed = distill("mtt", tr, 1, make_cfg(tmp_path), seed=1, checkpoint_dir=tmp_path / "ck", resume=True)
    assert torch.equal(straight.images, resumed.images) and torch.equal(straight.lr, resumed.lr)


def test_config_errors_name_the_field():
    spec = get("mtt")
    with pytest.raises(ConfigError, match=r"max_start_epoch \+ expert_step \(10 \+ 5\) must be <= expert_epochs"):
        spec.make_config({"expert_step": 5})
    with pytest.raises(ConfigError, match="syn_steps must be > 0"):
        spec.make_config({"syn_steps": 0})


def test_a_resume_may_move_the_cache(tmp_path):
    """--set cache_dir=NEW on a resume was refused ("the checkpointed run used config.cache_dir ..."), though the
    cache only stores what the seed determines (and a default cache_dir moved by $ATLAS_CACHE_DIR passed)."""
    from modelatlas.distill import run_distillation

    data = load_dataset("digits", "train").subset(torch.arange(200))
    kw = dict(dataset_test=data, eval_nets=1, eval_epochs=1, baseline=False)
    run_distillation("mtt", data, 1, tmp_path / "out", make_cfg(tmp_path, iterations=1), **kw)
    moved = make_cfg(tmp_path, iterations=2, cache_dir=str(tmp_path / "moved"))
    info = run_distillation("mtt", data, 1, tmp_path / "out", moved, resume=True, **kw)
    assert info["resumed"] and len(json.loads((tmp_path / "out" / "result.json").read_text())["losses"]) == 2


@pytest.mark.parametrize("edit", ["params", "epochs", "nan"])
def test_a_damaged_expert_buffer_is_named(tmp_path, edit):
    """Experts of another size or epoch count, or NaN trajectories, in the cache stopped MTT with a reshape
    RuntimeError / IndexError, or as 'diverged ... use smaller learning rates'."""
    from safetensors.torch import load_file, save_file

    from modelatlas.errors import CheckpointError

    tr = load_dataset("digits", "train").subset(torch.arange(100))
    cfg = get("mtt").make_config(make_cfg(tmp_path))
    _, path = B.load_or_train(tr, cfg, 0, torch.device("cpu"), None)
    state = load_file(str(path))
    fix = {"params": lambda v: v[:, :5], "epochs": lambda v: v[:1], "nan": lambda v: torch.full_like(v, float("nan"))}
    save_file({k: fix[edit](v).contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError, match="not an expert buffer of this config .*delete it to retrain"):
        B.load_or_train(tr, cfg, 0, torch.device("cpu"), None)


def test_a_run_diverged_by_its_learned_lr_names_lr_init():
    """MTT's learned lr starting at lr_init 1e30 diverged, and the hint named lr_img, inner_lr and lr_label only."""
    from modelatlas.errors import DivergedError

    tr = load_dataset("digits", "train").subset(torch.arange(100))
    cfg = {**make_cfg(Path("/nonexistent"), iterations=1, num_experts=1, expert_epochs=2, max_start_epoch=0,
                      syn_steps=1, expert_step=1, lr_init=1e30), "cache_dir": None}
    with pytest.raises(DivergedError, match=r"smaller learning rates \(--set lr_img=.*lr_init.*lr_lr"):
        distill("mtt", tr, 1, cfg)


def ctrl_c():
    """SIGINT to the main thread (os.kill may hand it to another one); Python runs the handler there next."""
    import signal
    import threading

    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def counting(monkeypatch, trained, at=None, then=None):
    """Patch train_expert to record the experts it trains; ``then`` runs inside expert ``at``."""
    real = B.train_expert

    def wrapped(train, cfg, seed, e, *a, **k):
        trained.append(e)
        if e == at:
            then()
        return real(train, cfg, seed, e, *a, **k)
    monkeypatch.setattr(B, "train_expert", wrapped)


@pytest.mark.parametrize("how", ["crash", "ctrl_c"])
def test_an_interrupted_buffer_keeps_its_finished_experts(tmp_path, monkeypatch, how):
    """A Ctrl-C or a crash while the experts trained lost them all (the buffer was written once complete): on
    Fashion-MNIST, hours. Each expert is kept as it ends; a rerun trains only the missing ones, and the buffer
    is bit-for-bit the one of an uninterrupted run."""
    from modelatlas.errors import InterruptWarning

    tr = load_dataset("digits", "train").subset(torch.arange(120))
    cfg = get("mtt").make_config(make_cfg(tmp_path, num_experts=4, expert_epochs=2, max_start_epoch=0))
    straight, _ = B.load_or_train(tr, get("mtt").make_config(make_cfg(tmp_path / "s", num_experts=4,
                                                                     expert_epochs=2, max_start_epoch=0)), 0, "cpu", None)

    def crash():
        raise RuntimeError("boom")
    trained: list[int] = []
    counting(monkeypatch, trained, at=2, then=crash if how == "crash" else ctrl_c)
    if how == "crash":
        with pytest.raises(RuntimeError, match="boom"):
            B.load_or_train(tr, cfg, 0, "cpu", None)
        kept = [0, 1]
    else:  # the first Ctrl-C finishes expert 2 and keeps it
        with pytest.warns(InterruptWarning, match="finishing the expert"), pytest.raises(KeyboardInterrupt):
            B.load_or_train(tr, cfg, 0, "cpu", None)
        kept = [0, 1, 2]
    path = tmp_path / "cache" / f"buffer-{B.buffer_key(tr, cfg, 0)}.safetensors"
    assert not path.exists() and sorted(p.name for p in path.with_suffix(".partial").iterdir()) == [
        f"expert{e}.safetensors" for e in kept]  # no temporary file left, nothing taken for the whole buffer
    monkeypatch.undo()
    trained.clear()
    counting(monkeypatch, trained)
    buf, _ = B.load_or_train(tr, cfg, 0, "cpu", None)
    assert trained == [e for e in range(4) if e not in kept] and torch.equal(buf, straight)
    assert path.is_file() and not path.with_suffix(".partial").exists()  # the units go once the whole is cached


@pytest.mark.parametrize("damage", [b"not a file of tensors", "shape"])
def test_a_damaged_kept_expert_is_trained_again_with_one_warning(tmp_path, monkeypatch, damage):
    from safetensors.torch import save_file

    from modelatlas.errors import CacheWarning

    tr = load_dataset("digits", "train").subset(torch.arange(120))
    cfg = get("mtt").make_config(make_cfg(tmp_path, num_experts=3, expert_epochs=2, max_start_epoch=0))
    straight, _ = B.load_or_train(tr, get("mtt").make_config(make_cfg(tmp_path / "s", num_experts=3,
                                                                     expert_epochs=2, max_start_epoch=0)), 0, "cpu", None)
    partial = tmp_path / "cache" / f"buffer-{B.buffer_key(tr, cfg, 0)}.partial"
    partial.mkdir(parents=True)
    save_file({"trajectory": straight[1].contiguous()}, str(partial / "expert1.safetensors"))
    if damage == "shape":
        save_file({"trajectory": straight[0, :2].contiguous()}, str(partial / "expert0.safetensors"))
    else:
        (partial / "expert0.safetensors").write_bytes(damage)
    trained: list[int] = []
    counting(monkeypatch, trained)
    with pytest.warns(CacheWarning, match=r"expert0\.safetensors.*training it again") as caught:
        buf, _ = B.load_or_train(tr, cfg, 0, "cpu", None)
    assert trained == [0, 2] and torch.equal(buf, straight)
    assert all("\n" not in str(w.message) for w in caught)


def test_an_interrupted_buffer_distils_as_an_uninterrupted_one(tmp_path, monkeypatch):
    tr = load_dataset("digits", "train").subset(torch.arange(120))
    straight = distill("mtt", tr, 1, make_cfg(tmp_path / "s"), seed=1)

    def crash():
        raise RuntimeError("boom")
    counting(monkeypatch, [], at=1, then=crash)
    with pytest.raises(RuntimeError, match="boom"):
        distill("mtt", tr, 1, make_cfg(tmp_path), seed=1)
    monkeypatch.undo()
    again = distill("mtt", tr, 1, make_cfg(tmp_path), seed=1)
    assert torch.equal(straight.images, again.images) and torch.equal(straight.lr, again.lr)
