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
