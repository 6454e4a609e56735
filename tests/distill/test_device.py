"""The distillation's device code paths on the simulated accelerator of ``conftest.py`` (no GPU here): every
method and its evaluation run on the device as CUDA would let them (no CPU tensor mixed in, no CPU generator
drawing device tensors), come back on the CPU, and equal the CPU run bit for bit (the same kernels compute
both, so any difference is a tensor that went another way)."""

from dataclasses import replace

import pytest
import torch

from modelatlas.data import load_dataset
from modelatlas.distill import default_protocol, distill, evaluate_synthetic


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def check_same_set(a, b):
    assert type(b.images) is torch.Tensor and b.images.device.type == "cpu"  # handed back on the CPU
    assert torch.equal(a.images.detach(), b.images.detach()) and torch.equal(a.targets(), b.targets())
    assert sorted(a.extras) == sorted(b.extras) and all(torch.equal(v, b.extras[k]) for k, v in a.extras.items())


REFUSED = {  # what CUDA refuses (d: the device), refused by the simulation too
    "cpu operand": lambda d: torch.ones(3, device=d) + torch.ones(3),
    "cpu generator": lambda d: torch.randn(3, device=d, generator=torch.Generator()),
    "cpu generator in place": lambda d: torch.empty(3, device=d).uniform_(generator=torch.Generator()),
    "index_select by cpu index": lambda d: torch.ones(3, device=d).index_select(0, torch.tensor([0])),
    "cpu tensor by device index": lambda d: torch.ones(3)[torch.tensor([0], device=d)],
    "cpu values put": lambda d: torch.ones(3, device=d).index_put_((torch.tensor([0, 1]),), torch.ones(2)),
    "cpu network": lambda d: torch.nn.Linear(3, 2)(torch.ones(1, 3, device=d)),
    "cpu targets": lambda d: torch.nn.functional.cross_entropy(torch.ones(2, 3, device=d), torch.tensor([0, 1])),
    "numpy": lambda d: torch.ones(3, device=d).numpy(),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_simulation_refuses_what_cuda_refuses(case, sim_device):
    with sim_device, pytest.raises(sim_device.Error):
        REFUSED[case](sim_device.device)


def test_the_simulation_allows_what_cuda_allows_with_the_cpus_values(sim_device):
    SIM = sim_device.device
    with sim_device as mode:
        x = torch.arange(4.0).to(SIM)
        picked = x[torch.tensor([3, 0])]  # CPU indices into a device tensor: allowed
        masked = x[torch.tensor([True, False, True, False])]
        x[torch.tensor([1])] = 7.0
        scaled = x * torch.tensor(2.0)  # a 0-dim CPU tensor is a scalar
        made = torch.tensor([1.0, 2.0], device=SIM)  # torch.tensor's data reaches the device
        drawn = torch.rand(2, device=SIM)  # the device's own stream: recorded
    assert isinstance(picked, sim_device.Tensor) and picked.cpu().tolist() == [3.0, 0.0]
    assert masked.cpu().tolist() == [0.0, 2.0] and scaled.cpu().tolist() == [0.0, 14.0, 4.0, 6.0]
    assert made.tolist() == [1.0, 2.0] and type(x.cpu()) is torch.Tensor and drawn.shape == (2,)
    assert mode.draws == ["aten.rand.default"] and mode.ops > 0


METHODS = ("dc", "dm", "dsa", "hello", "herding", "mtt", "podd", "random", "ratbptt", "teddy")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_the_device_as_on_the_cpu(method, tiny, digits, sim_device, tmp_path):
    train = digits[0]
    cpu = distill(method, train, 1, tiny(method, tmp_path / "cpu"), seed=0, device="cpu")
    with sim_device:
        dev = distill(method, train, 1, tiny(method, tmp_path / "dev"), seed=0, device=sim_device.device)
    check_same_set(cpu, dev)
    # every draw came from a seeded CPU generator: a GPU run draws the CPU run's numbers
    assert sim_device.draws == []
    assert (sim_device.ops > 0) == (method != "random")  # a random subset is picked on the CPU


@pytest.mark.parametrize("method", ("hello", "dsa"))
def test_the_evaluation_on_the_device_scores_as_on_the_cpu(method, tiny, digits, sim_device, tmp_path):
    """HeLlO's labels come from its projector on the fly; DSA's evaluation augments every batch."""
    train, test = digits
    cfg = tiny(method, tmp_path)
    syn = distill(method, train, 1, cfg, seed=0, device="cpu")
    proto = replace(default_protocol(method, cfg, train.input_shape, eval_nets=1), epochs=2)
    cpu = evaluate_synthetic(syn, test, proto, seed=0, device="cpu")
    with sim_device:
        dev = evaluate_synthetic(syn, test, proto, seed=0, device=sim_device.device)
    assert dev.accuracies == cpu.accuracies and sim_device.ops > 0 and sim_device.draws == []


@pytest.mark.parametrize("method", ("hello", "mtt", "podd"))
def test_a_run_resumed_on_the_device_is_the_straight_cpu_run(method, tiny, digits, sim_device, tmp_path):
    """The checkpoint (read on the CPU) is loaded into the device's set, optimisers (Adam's step stays on the CPU)
    and method states (HeLlO's projector, MTT's learned lr, PoDD's poster and label grid)."""
    train, ck = digits[0], tmp_path / "ckpt"
    straight = distill(method, train, 1, tiny(method, tmp_path / "cpu"), seed=0, device="cpu")
    with sim_device:
        dev = sim_device.device
        distill(method, train, 1, tiny(method, tmp_path / "dev", iterations=1), seed=0, checkpoint_dir=ck, device=dev)
        resumed = distill(method, train, 1, tiny(method, tmp_path / "dev"), seed=0, checkpoint_dir=ck, resume=True,
                          device=dev)
    check_same_set(straight, resumed)


def test_a_result_made_and_reevaluated_on_the_device_is_the_cpus(sim_device, tmp_path):
    """The whole API on the device: distil, score against the baseline, write the folder, re-evaluate it."""
    from modelatlas.distill import run_distillation
    from modelatlas.distill.reevaluate import evaluate_result

    cfg = {"iterations": 1, "width": 8, "batch_real": 16, "teacher_steps": 3, "projector_steps": 2,
           "head_init": "class_mean", "cache_dir": str(tmp_path / "cache")}
    runs = {}
    for name, device in (("cpu", "cpu"), ("dev", sim_device.device)):
        with sim_device:
            info = run_distillation("hello", "digits", 1, tmp_path / name, config=cfg, eval_nets=1, eval_epochs=1,
                                    device=device)
            again = evaluate_result(tmp_path / name, device=device)
        runs[name] = (info["evaluation"]["accuracies"], info["baseline_random"]["accuracies"], again["accuracies"],
                      (tmp_path / name / "synthetic.safetensors").read_bytes())
    assert runs["dev"] == runs["cpu"] and sim_device.ops > 0


def test_labels_looked_up_on_the_cpu_train_a_net_on_the_device(digits, sim_device):
    """A label_fn may return its targets on the CPU (a lookup in stored per-crop labels, bench/efficient.py):
    the batch's device takes them, as the hard labels (on the CPU a no-op: the same accuracies)."""
    from modelatlas.distill.evaluate import EvalProtocol, evaluate_tensors

    train, test = digits
    x, y = train.x[:20], train.y[:20]
    table = torch.nn.functional.one_hot(y, 10).float() * 0.9 + 0.01  # (N, K), kept on the CPU
    proto = EvalProtocol(kind="sgd", num_nets=1, epochs=2, width=8, depth=2)
    cpu = evaluate_tensors(x, y, test, proto, label_fn=lambda xb, idx, e: table[idx], device="cpu")
    with sim_device:
        dev = evaluate_tensors(x, y, test, proto, label_fn=lambda xb, idx, e: table[idx], device=sim_device.device)
    assert dev.accuracies == cpu.accuracies
