import json

import pytest
import torch
import torch.nn.functional as F

from modelatlas.cli.main import main
from modelatlas.data import load_dataset
from modelatlas.distill import EvalProtocol, distill, evaluate_synthetic, methods
from modelatlas.distill.evaluate import evaluate_tensors
from modelatlas.distill.methods.hello.method import make_label_fn, sized_text_head
from modelatlas.distill.methods.hello.projector import (
    LabelProjector,
    class_prompts,
    lora_param_count,
    stored_label_bytes,
)
from modelatlas.distill.nets import make_net
from modelatlas.distill.synthetic import SyntheticSet
from modelatlas.errors import ConfigError

TINY = {"iterations": 2, "width": 8, "batch_real": 16, "teacher_steps": 5, "projector_steps": 3,
        "head_init": "class_mean"}


def make_fake_encoder(dim=384):
    def encode(texts):
        gen = torch.Generator().manual_seed(len(texts))
        return torch.randn(len(texts), dim, generator=gen) * 3.0
    return encode


def test_lora_param_count_hand_checked():
    backbone = make_net("convnet", (1, 8, 8), 10, 8, 2, seed=0)  # feature_dim 8 * 2 * 2 = 32
    head = F.normalize(torch.randn(10, 384), dim=1)
    proj = LabelProjector(backbone, backbone.feature_dim, head, rank=4, proj_seed=0)
    n = sum(p.numel() for p in proj.trainable())
    assert n == 4 * 384 + 10 * 4 + 1 + 10 == lora_param_count(10, 384, 4) == 1587
    stored = LabelProjector(backbone, 32, head, 4, 0, store_head=True)
    assert sum(p.numel() for p in stored.trainable()) == 1587 + 3840 == lora_param_count(10, 384, 4, True)
    x = torch.rand(3, 1, 8, 8)
    base = proj.log_scale.exp() * proj.features(x) @ head.T  # B = 0: the projector starts at the text head
    assert torch.allclose(proj(x), base, atol=1e-6)


def test_head_init_equals_normalised_text_embeddings():
    enc = make_fake_encoder()
    names = [str(i) for i in range(10)]
    head = sized_text_head(names, 384, enc)
    assert torch.allclose(head, F.normalize(torch.as_tensor(enc(class_prompts(names))), dim=1))
    assert torch.allclose(head.norm(dim=1), torch.ones(10))
    assert class_prompts(["0", "7", "Coat"]) == ["the digit zero", "the digit seven", "a photo of a Coat"]


def test_label_storage_byte_arithmetic():
    assert stored_label_bytes(100, 10, 300) == 300 * 100 * 10 * 4 == 1_200_000
    assert stored_label_bytes(10, 10, 300, bytes_per_value=2) == 60_000
    assert stored_label_bytes(100, 10, 300) // (lora_param_count(10, 384, 4) * 4) >= 100  # 189x at IPC 10


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def test_hello_end_to_end_labels_on_the_fly(digits, tmp_path):
    train, test = digits
    syn = distill("hello", train, 1, TINY, seed=0)
    assert syn.meta["label_generator"].endswith(":make_label_fn")
    assert {"projector.A", "projector.B", "projector.W0", "backbone.features.0.weight"} <= set(syn.extras)
    syn.save(tmp_path / "s")
    again = SyntheticSet.load(tmp_path / "s")
    fn = make_label_fn(again, torch.device("cpu"))
    labels = fn(again.images[:4], torch.arange(4), 0)
    assert labels.shape == (4, 10) and torch.allclose(labels.sum(1), torch.ones(4))
    p = EvalProtocol(num_nets=1, epochs=2, width=8, depth=2, dsa=True)
    assert 0 <= evaluate_synthetic(again, test, p).mean <= 100


def test_teacher_is_trained_once_then_loaded(digits, tmp_path):
    train, _ = digits
    cfg = {**TINY, "cache_dir": str(tmp_path / "cache")}
    first = distill("hello", train, 1, cfg, seed=3)
    second = distill("hello", train, 1, cfg, seed=3)
    assert first.meta["teacher_trained_now"] and not second.meta["teacher_trained_now"]
    assert first.meta["teacher"] == second.meta["teacher"] and len(list((tmp_path / "cache").iterdir())) == 1
    # the loaded teacher gives the same projector, labels and images as the freshly trained one
    assert torch.equal(first.images, second.images)
    assert all(torch.equal(first.extras[k], second.extras[k]) for k in first.extras)
    distill("hello", train, 1, {**cfg, "teacher_steps": 6}, seed=3)  # other settings: another teacher
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_corrupt_cached_teacher_is_named(digits, tmp_path):
    from modelatlas.errors import CheckpointError

    train, _ = digits
    cfg = {**TINY, "cache_dir": str(tmp_path)}
    path = distill("hello", train, 1, cfg).meta["teacher"]
    with open(path, "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"teacher-\w+\.safetensors: unreadable .*; delete it to retrain the teacher"):
        distill("hello", train, 1, cfg)


def test_a_cached_teacher_with_nan_weights_is_named(digits, tmp_path):
    """NaN weights in the cached teacher gave NaN soft labels: the run stopped as 'diverged ... use smaller
    learning rates'."""
    from safetensors.torch import load_file, save_file

    from modelatlas.errors import CheckpointError

    train, _ = digits
    cfg = {**TINY, "cache_dir": str(tmp_path)}
    path = distill("hello", train, 1, cfg).meta["teacher"]
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(path).items()}, path)
    with pytest.raises(CheckpointError, match=r"teacher-\w+\.safetensors: not a teacher of this network \(NaN or "
                                              r"infinite weights\); delete it to retrain"):
        distill("hello", train, 1, cfg)


def test_label_fn_hook_and_fixed_crops(digits):
    train, test = digits
    x, y = train.x[:20], train.y[:20]
    seen = []

    def label_fn(xb, idx, epoch):
        seen.append((xb.clone(), idx.clone(), epoch))
        return y[idx]
    p = EvalProtocol(num_nets=2, epochs=2, width=8, depth=2, dsa=True, batch_size=20)
    evaluate_tensors(x, y, test, p, label_fn=label_fn, crop_seed=5)
    (a, ia, ea), (b, ib, eb) = seen[0], seen[2]  # epoch 0 of net 0 and of net 1
    assert ea == eb == 0 and torch.equal(a[torch.argsort(ia)], b[torch.argsort(ib)])  # same crops per image


def test_config_errors():
    with pytest.raises(ConfigError, match="head_init must be one of"):
        methods.get("hello").make_config({"head_init": "random"})
    with pytest.raises(ConfigError, match="rank must be > 0"):
        methods.get("hello").make_config({"rank": 0})


def test_cli_hello_tiny(tmp_path, capsys):
    out = tmp_path / "hello"
    sets = [x for k, v in TINY.items() if k != "iterations" for x in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["distill", "run", "--method", "hello", "--dataset", "digits", "--ipc", "1", "--out", str(out),
                 "--iterations", "2", "--eval-nets", "1", "--eval-epochs", "2", "--no-baseline", *sets]) == 0
    assert "hello ipc 1 on digits:" in capsys.readouterr().out
    assert json.loads((out / "synthetic.json").read_text())["meta"]["hello"]["rank"] == 4


@pytest.fixture(scope="module")
def hello_set(digits):
    return distill("hello", digits[0], 1, TINY, seed=0)


@pytest.mark.parametrize("edit,file,message", [
    (lambda s: s.extras.pop("projector.A"), "synthetic.safetensors", "'extra.projector.A' .* is missing"),
    (lambda s: [s.extras.pop(k) for k in list(s.extras) if k.startswith("backbone.")], "synthetic.safetensors",
     r"'extra.backbone.features.0.weight' .* is missing, expected shape \(8, 1, 3, 3\)"),
    (lambda s: s.extras.update({"projector.B": torch.zeros(3, 4)}), "synthetic.safetensors",
     r"'extra.projector.B' .* of shape \(3, 4\), expected shape \(10, 4\)"),
    (lambda s: s.meta.pop("hello"), "synthetic.json", "meta hello must be an object"),
    (lambda s: s.meta["hello"].update(rank="x"), "synthetic.json", "meta hello rank must be a positive integer"),
    (lambda s: s.meta["hello"].update(input_shape=[1, 4, 4]), "synthetic.json", "input_shape .* is not the images'"),
])
def test_hand_edited_hello_result_names_the_file(hello_set, tmp_path, edit, file, message):
    """Tensors missing from the projector were left random by strict=False loads: the evaluation ran, silently,
    on labels of a random backbone; bad settings raised KeyError / TypeError tracebacks."""
    import copy

    from modelatlas.distill.result import load_result, write_result
    from modelatlas.errors import CheckpointError

    syn = copy.deepcopy(hello_set)
    edit(syn)
    write_result(tmp_path, syn, None, {"method": "hello", "dataset": "digits"}, losses=[])
    with pytest.raises(CheckpointError, match=message) as e:
        load_result(tmp_path)
    assert str(e.value).startswith(str(tmp_path / file))


def test_unedited_hello_result_loads(hello_set, tmp_path):
    from modelatlas.distill.result import load_result, write_result

    write_result(tmp_path, hello_set, None, {"method": "hello", "dataset": "digits"}, losses=[])
    assert load_result(tmp_path)[0].meta["hello"]["rank"] == 4


def test_a_ctrl_c_in_the_teacher_keeps_it_and_a_crash_after_it_keeps_it(digits, tmp_path, monkeypatch):
    """The teacher is HeLlO's pre-training: a first Ctrl-C while it trains finishes and caches it, then stops; a
    crash in the later stages leaves it cached. The rerun trains no teacher and gives an uninterrupted run's set."""
    import signal
    import threading

    from modelatlas.distill.methods.hello import method as H
    from modelatlas.errors import InterruptWarning

    train, _ = digits
    straight = distill("hello", train, 1, {**TINY, "cache_dir": str(tmp_path / "straight")}, seed=3)
    cfg = {**TINY, "cache_dir": str(tmp_path / "cache")}
    real, real_fit = H.train_teacher, H.fit_projector

    def interrupted(*a, **k):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # not os.kill: another thread may take it
        return real(*a, **k)
    monkeypatch.setattr(H, "train_teacher", interrupted)
    with pytest.warns(InterruptWarning, match="finishing the teacher"), pytest.raises(KeyboardInterrupt):
        distill("hello", train, 1, cfg, seed=3)
    monkeypatch.setattr(H, "train_teacher", lambda *a, **k: pytest.fail("the teacher was trained again"))
    monkeypatch.setattr(H, "fit_projector", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        distill("hello", train, 1, cfg, seed=3)
    monkeypatch.setattr(H, "fit_projector", real_fit)
    again = distill("hello", train, 1, cfg, seed=3)
    assert not again.meta["teacher_trained_now"] and torch.equal(again.images, straight.images)
    assert all(torch.equal(again.extras[k], straight.extras[k]) for k in straight.extras)

