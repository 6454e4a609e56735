import json

import pytest
import torch

from modelatlas.data import load_dataset
from modelatlas.data.transforms import Standardize
from modelatlas.distill import distill
from modelatlas.distill.loop import OuterLoop, RNGState, flatten_state, unflatten_state
from modelatlas.distill.result import load_result, write_result
from modelatlas.distill.synthetic import SyntheticSet
from modelatlas.errors import CheckpointError, ConfigError


def make_problem():
    syn = SyntheticSet.from_noise((1, 4, 4), 2, 2, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([syn.images], lr=0.1)

    def step(it, gen):
        noise = torch.randn(syn.images.shape, generator=gen) + torch.rand(())  # generator and global RNG
        loss = ((syn.images - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())
    return syn, opt, step


class Crash(Exception):
    pass


def test_resume_after_crash_gives_identical_tensors(tmp_path):
    k = 3
    syn_a, opt_a, step_a = make_problem()
    losses_a = OuterLoop(2 * k, seed=7).run(step_a, {"synthetic": syn_a, "optimizer": opt_a})

    syn_b, opt_b, step_b = make_problem()

    def crashing(it, gen):
        if it == k + 1:
            raise Crash()
        return step_b(it, gen)
    with pytest.raises(Crash):
        OuterLoop(2 * k, seed=7, checkpoint_dir=tmp_path, checkpoint_every=k).run(crashing, {"synthetic": syn_b, "optimizer": opt_b})
    assert json.loads((tmp_path / "checkpoint.json").read_text())["iteration"] == k

    syn_c, opt_c, step_c = make_problem()  # a fresh process: nothing in memory
    losses_c = OuterLoop(2 * k, seed=7, checkpoint_dir=tmp_path, checkpoint_every=k, resume=True).run(
        step_c, {"synthetic": syn_c, "optimizer": opt_c})
    assert torch.equal(syn_a.images, syn_c.images) and losses_a == losses_c
    assert torch.equal(opt_a.state_dict()["state"][0]["exp_avg"], opt_c.state_dict()["state"][0]["exp_avg"])


def ctrl_c() -> None:
    """SIGINT to the main thread itself (Python runs its handler there before the next bytecode), not to the
    process, which the kernel may hand to another thread (torch's)."""
    import signal
    import threading

    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def test_ctrl_c_finishes_the_iteration_saves_it_and_a_resume_loses_nothing(tmp_path):
    # a Ctrl-C lost up to checkpoint_every - 1 iterations (49 by default): the day-one review, session 37
    import signal

    from modelatlas.errors import InterruptWarning

    syn_a, opt_a, step_a = make_problem()
    losses_a = OuterLoop(12, seed=7).run(step_a, {"synthetic": syn_a, "optimizer": opt_a})
    syn_b, opt_b, step_b = make_problem()

    def interrupted(it, gen):
        if it == 4:
            ctrl_c()  # in the middle of iteration 5 of 12
        return step_b(it, gen)
    with pytest.warns(InterruptWarning, match="finishing this iteration"), pytest.raises(KeyboardInterrupt):
        OuterLoop(12, seed=7, checkpoint_dir=tmp_path, checkpoint_every=10).run(
            interrupted, {"synthetic": syn_b, "optimizer": opt_b})
    assert json.loads((tmp_path / "checkpoint.json").read_text())["iteration"] == 5  # not 0: nothing was lost
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    syn_c, opt_c, step_c = make_problem()
    losses_c = OuterLoop(12, seed=7, checkpoint_dir=tmp_path, checkpoint_every=10, resume=True).run(
        step_c, {"synthetic": syn_c, "optimizer": opt_c})
    assert torch.equal(syn_a.images, syn_c.images) and losses_a == losses_c


def test_a_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(tmp_path):
    import signal

    syn, opt, step = make_problem()
    seen = []

    def twice(it, gen):
        if it == 4:
            ctrl_c()
            ctrl_c()  # raises here, inside the step
            seen.append("after")
        return step(it, gen)
    with pytest.warns(UserWarning), pytest.raises(KeyboardInterrupt):
        OuterLoop(12, seed=7, checkpoint_dir=tmp_path, checkpoint_every=2).run(twice, {"synthetic": syn, "optimizer": opt})
    assert not seen and json.loads((tmp_path / "checkpoint.json").read_text())["iteration"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_with_other_seed_is_refused(tmp_path):
    syn, opt, step = make_problem()
    OuterLoop(2, seed=1, checkpoint_dir=tmp_path, checkpoint_every=1).run(step, {"synthetic": syn, "optimizer": opt})
    with pytest.raises(CheckpointError, match="checkpoint.json: was written with seed 1, not 2"):
        OuterLoop(4, seed=2, checkpoint_dir=tmp_path, resume=True).run(step, {"synthetic": syn, "optimizer": opt})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_diverged_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, bad):
    # a NaN loss left NaN images, which were evaluated (~chance) and saved as a result
    from modelatlas.errors import DivergedError

    syn, opt, step = make_problem()
    losses = []

    def diverging(it, gen):
        losses.append(step(it, gen))
        return bad if it == 4 else losses[-1]

    with pytest.raises(DivergedError, match=f"diverged at iteration 5 of 6: its loss is {bad} \\(the checkpoint of "
                                            "iteration 4 is kept, but resuming repeats the same steps\\)"):
        OuterLoop(6, seed=0, checkpoint_dir=tmp_path, checkpoint_every=2).run(diverging, {"synthetic": syn})
    assert json.loads((tmp_path / "checkpoint.json").read_text())["iteration"] == 4
    with pytest.raises(DivergedError, match="nothing was kept"):
        OuterLoop(3, seed=0).run(lambda it, gen: bad, {})


def test_a_resumed_run_that_diverges_names_the_checkpoint_it_resumed_from(tmp_path):
    """A run of 3 iterations (checkpoint_every 50: saved at its end) extended to 6 that diverged at iteration 5
    said "nothing was kept", though the checkpoint of iteration 3 was."""
    from modelatlas.errors import DivergedError

    syn, opt, step = make_problem()
    OuterLoop(3, seed=0, checkpoint_dir=tmp_path).run(step, {"synthetic": syn, "optimizer": opt})
    with pytest.raises(DivergedError, match=r"\(the checkpoint of iteration 3 is kept, but resuming repeats"):
        OuterLoop(6, seed=0, checkpoint_dir=tmp_path, resume=True).run(
            lambda it, gen: float("nan") if it == 4 else step(it, gen), {"synthetic": syn, "optimizer": opt})


def test_flatten_roundtrip():
    state = {"a": torch.ones(2), "b": [1, (2.0, torch.zeros(1))], 3: {"c": None}}
    tensors = {}
    back = unflatten_state(json.loads(json.dumps(flatten_state(state, "s", tensors))), tensors)
    assert torch.equal(back["a"], torch.ones(2)) and back["b"][1][0] == 2.0 and back[3] == {"c": None}


def test_method_resume_equals_straight_run(tmp_path):
    tr = load_dataset("digits", "train")
    cfg = {"iterations": 4, "checkpoint_every": 2, "width": 8, "batch_real": 16}
    straight = distill("dm", tr, 1, cfg, seed=3)
    distill("dm", tr, 1, {**cfg, "iterations": 2}, seed=3, checkpoint_dir=tmp_path)  # "killed" after 2
    resumed = distill("dm", tr, 1, cfg, seed=3, checkpoint_dir=tmp_path, resume=True)
    assert torch.equal(straight.images, resumed.images)
    saved = (tmp_path / "checkpoint.json").read_text()
    with pytest.raises(ConfigError, match="checkpoint.json exists: pass resume=True"):  # never overwritten
        distill("dm", tr, 1, cfg, seed=3, checkpoint_dir=tmp_path)
    assert (tmp_path / "checkpoint.json").read_text() == saved
    with pytest.raises(CheckpointError, match="state 'synthetic' does not fit this run .*other settings .ipc"):
        distill("dm", tr, 2, cfg, seed=3, checkpoint_dir=tmp_path, resume=True)  # 2 images per class, not 1


def test_distilling_leaves_the_callers_global_rng_alone():
    """Each outer iteration seeds torch's global generator (for code that draws from it); the caller's own
    stream continues after the run as if nothing had happened."""
    syn, opt, step = make_problem()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    OuterLoop(3, seed=0).run(step, {})
    assert torch.equal(torch.rand(3), expected)


def test_result_folder_roundtrip(tmp_path):
    syn = SyntheticSet.from_noise((1, 8, 8), 3, 2, torch.Generator().manual_seed(0))
    tf = Standardize().fit(torch.rand(10, 1, 8, 8))
    write_result(tmp_path, syn, tf, {"method": "x", "evaluation": {"mean": 1.0}}, [3.0, 2.0, 1.0])
    for f in ("synthetic.safetensors", "synthetic.json", "transform.safetensors", "result.json", "images.png", "loss.png"):
        assert (tmp_path / f).is_file()
    assert (tmp_path / "images.png").read_bytes()[:4] == b"\x89PNG"
    syn2, tf2, info = load_result(tmp_path)
    assert torch.equal(syn2.images, syn.images.detach()) and torch.equal(tf2.mean_, tf.mean_)
    assert info["losses"] == [3.0, 2.0, 1.0] and info["transform"] == "standardize"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="result.json: missing; not a distillation result folder"):
        load_result(tmp_path / "empty")


@pytest.mark.parametrize("name", ["result.json", "synthetic.safetensors"])
def test_a_file_of_a_result_folder_names_the_folder(tmp_path, name):
    """`atlas distill eval runs/dm10/result.json` (or --init-from its synthetic.safetensors) said
    "runs/dm10/result.json/result.json: missing; not a distillation result folder"."""
    syn = SyntheticSet.from_noise((1, 8, 8), 3, 2, torch.Generator().manual_seed(0))
    write_result(tmp_path, syn, None, {"method": "x"}, [1.0])
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / name}: a file, not a distillation result folder; "
                                              rf"pass the folder `atlas distill run --out` wrote \({tmp_path}\)$"):
        load_result(tmp_path / name)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'nope'}: no such folder; give a result folder"):
        load_result(tmp_path / "nope")


def test_a_file_outside_a_result_folder_names_no_folder(tmp_path):
    """`atlas distill eval forest.json` (a lineage JSON) said "pass the folder `atlas distill run --out` wrote
    (.)": its folder, which holds no result, was offered as the one to pass."""
    (tmp_path / "forest.json").write_text('{"format": "modelatlas-lineage/1"}')
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'forest.json'}: a file, not a distillation result "
                                              r"folder; pass the folder `atlas distill run --out` wrote$"):
        load_result(tmp_path / "forest.json")


def check_png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_grid_puts_one_image_per_class_side_by_side():
    from modelatlas.distill.result import render_grid

    one = SyntheticSet(torch.rand(13, 1, 8, 8), torch.arange(13), 13, class_names=[f"c{i}" for i in range(13)])
    w, h = check_png_size(render_grid(one))
    assert w > 3 * h  # two rows of up to 10, not a column of 13
    three = SyntheticSet(torch.rand(6, 1, 8, 8), torch.arange(2).repeat_interleave(3), 2)
    w, h = check_png_size(render_grid(three))
    assert w > h  # one row per class, 3 images wide


@pytest.mark.parametrize("ipc", [1, 2])
def test_grid_draws_at_most_the_first_classes(ipc, monkeypatch):
    # 1,000 classes at ipc 2 took ~50 s to draw, one row per class: a figure 1,000 inches tall
    from modelatlas.distill import result

    monkeypatch.setattr(result, "MAX_CLASSES_DRAWN", 4)  # (100 by default: a small cap keeps the test fast)
    syn = SyntheticSet(torch.rand(12 * ipc, 1, 4, 4), torch.arange(12).repeat_interleave(ipc), 12)
    small = SyntheticSet(syn.images[:4 * ipc], syn.classes[:4 * ipc], 4)
    (w, h), (w4, h4) = check_png_size(result.render_grid(syn)), check_png_size(result.render_grid(small))
    assert w == w4 and h4 <= h <= h4 + 40  # the first 4 classes alone, and a line saying so


@pytest.mark.parametrize("ipc", [1, 2])
def test_grid_of_two_channel_images(ipc):
    """matplotlib has no 2-channel image: render_grid raised TypeError after a whole run (no images.png)."""
    from modelatlas.distill.result import render_grid

    syn = SyntheticSet(torch.rand(2 * ipc, 2, 4, 4), torch.arange(2).repeat_interleave(ipc), 2)
    assert render_grid(syn).startswith(b"\x89PNG")


@pytest.mark.parametrize("ipc", [1, 2])
def test_grid_of_flat_vectors(ipc):
    """Inputs of shape (D,) (an MLP's tabular data) raised a permute RuntimeError in render_grid after the whole
    run, leaving result.json without images.png."""
    from modelatlas.distill.result import render_grid

    syn = SyntheticSet(torch.rand(2 * ipc, 16), torch.arange(2).repeat_interleave(ipc), 2)
    assert render_grid(syn).startswith(b"\x89PNG")


def test_result_of_an_interrupted_run_says_to_resume(tmp_path):
    """`atlas distill eval` on a run stopped by Ctrl-C said "not a distillation result folder (run `atlas
    distill run` first)", though it had been run."""
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "checkpoint.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"result.json: missing: the run stopped before its result .*with "
                                              r"--resume"):
        load_result(tmp_path)


@pytest.mark.parametrize("key,value,message", [
    ("iteration", None, "key 'iteration' is missing or not an integer"),
    ("tensors", 3, "key 'tensors' is missing or not a file name"),
    ("states", [], "key 'states' is missing or not an object"),
    # iteration -1 ran iterations -1..3 on top of the 2 saved losses; a short list left a history of 1 loss
    ("iteration", -1, r"iteration -1 does not match its 2 losses \(numbers\)"),
    ("losses", [1.0], r"iteration 2 does not match its 1 losses \(numbers\)"),
    ("losses", ["x", 1.0], r"iteration 2 does not match its 2 losses \(numbers\)"),
])
def test_hand_edited_checkpoint_json_is_named(tmp_path, key, value, message):
    """A checkpoint.json without 'iteration' raised KeyError on --resume."""
    syn, opt, step = make_problem()
    OuterLoop(2, seed=1, checkpoint_dir=tmp_path, checkpoint_every=1).run(step, {"synthetic": syn, "optimizer": opt})
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    meta.pop(key) if value is None else meta.__setitem__(key, value)
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"checkpoint.json: {message}; delete the checkpoint folder"):
        OuterLoop(4, seed=1, checkpoint_dir=tmp_path, resume=True).run(step, {"synthetic": syn, "optimizer": opt})


def test_resume_of_a_finished_run_adds_no_wall_time(tmp_path):
    from modelatlas.distill import run_distillation

    data = load_dataset("digits", "train").subset(torch.arange(100))
    cfg = {"iterations": 1, "width": 8, "batch_real": 8}
    run_distillation("dm", data, 1, tmp_path, cfg, dataset_test=data, eval_nets=1, eval_epochs=1, baseline=False)
    ckpt = tmp_path / "checkpoint" / "checkpoint.json"
    ckpt.write_text(json.dumps({**json.loads(ckpt.read_text()), "wall_time_s": 1000.0}))
    # another evaluation scores the set again, but no iteration was left: the setup (~1 s: torch's first
    # optimiser imports torch._dynamo) was added to the distillation time on every such resume
    info = run_distillation("dm", data, 1, tmp_path, cfg, dataset_test=data, eval_nets=2, eval_epochs=1,
                            baseline=False, resume=True)
    assert info["wall_time_s"] == 1000.0 and info["resumed"]


def make_gpu_machine(monkeypatch, gpus: int, busy: bool = False):
    """torch.cuda as a machine with ``gpus`` visible GPUs shows it (there is none here): one RNG state per GPU;
    setting the state of GPU i >= gpus raises IndexError (torch.cuda.random: default_generators[i]); ``busy``:
    CUDA cannot start (an exclusive-process GPU in use)."""
    def get_all():
        if busy:
            raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")
        return [torch.full((16,), i, dtype=torch.uint8) for i in range(gpus)]

    def set_all(states):
        for i, _ in enumerate(states):
            if i >= gpus:
                raise IndexError("tuple index out of range")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", get_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)


def test_a_cpu_run_on_a_machine_with_a_busy_gpu_checkpoints(tmp_path, monkeypatch):
    """The checkpoint read CUDA's RNG states, which started CUDA: a --device cpu run failed at its first save."""
    make_gpu_machine(monkeypatch, 1, busy=True)
    syn, opt, step = make_problem()
    OuterLoop(2, seed=3, checkpoint_dir=tmp_path, checkpoint_every=1).run(step, {"synthetic": syn, "optimizer": opt})
    assert json.loads((tmp_path / "checkpoint.json").read_text())["iteration"] == 2


def test_a_run_checkpointed_with_two_gpus_resumes_with_one(tmp_path, monkeypatch):
    """A checkpoint of a 2-GPU machine was refused on one GPU ('state rng does not fit this run'); the CUDA
    states are not needed: every iteration reseeds every generator."""
    make_gpu_machine(monkeypatch, 2)
    syn_a, opt_a, step_a = make_problem()
    OuterLoop(3, seed=3).run(step_a, {"synthetic": syn_a, "optimizer": opt_a})
    syn, opt, step = make_problem()
    OuterLoop(2, seed=3, checkpoint_dir=tmp_path, checkpoint_every=1).run(step, {"synthetic": syn, "optimizer": opt})
    make_gpu_machine(monkeypatch, 1)  # e.g. CUDA_VISIBLE_DEVICES=0
    syn, opt, step = make_problem()
    OuterLoop(3, seed=3, checkpoint_dir=tmp_path, resume=True).run(step, {"synthetic": syn, "optimizer": opt})
    assert torch.equal(syn.images, syn_a.images)
    old = {**RNGState().state_dict(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}  # written before the fix
    RNGState().load_state_dict(old)


def test_the_loop_reseeds_the_cpu_stream_every_iteration_and_no_device_stream(monkeypatch):
    """torch.manual_seed also reset every GPU's stream (and MPS's) each iteration, which no method draws from
    (test_device.py) and fork_rng(devices=[]) does not restore: a caller's CUDA stream was left reseeded. The
    CPU's stream is still reseeded from (seed, iteration): a draw of iteration ``it`` is the same numbers."""
    from modelatlas.seeding import derive_seed

    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(("cuda", seed)))
    monkeypatch.setattr(torch.mps, "manual_seed", lambda seed: reseeded.append(("mps", seed)))
    drawn = []
    OuterLoop(3, seed=5).run(lambda it, gen: drawn.append(torch.rand(2)) or 0.0, {})
    assert reseeded == []
    for it, x in enumerate(drawn):
        assert torch.equal(x, torch.rand(2, generator=torch.Generator().manual_seed(derive_seed(5, "iteration", it))))
