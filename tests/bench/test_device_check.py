"""bench/device_check.py, run here on the CPU: what it will run on a lent GPU must not fail there first."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "device_check.py"
TINY_POSTER = '{"poster_ipc": 1.0, "total": 4, "window": 2, "batch_real": 32, "width": 8}'


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))  # its first import, bench/short_spin.py, as `python bench/...` finds it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def make_report(device_check, out: Path, *extra: str) -> tuple[int, dict]:
    rc = device_check.main(["--device", "cpu", "--methods", "dm", "podd", "--eval-epochs", "2", "--out", str(out),
                            *extra])
    return rc, json.loads((out / "device_check.json").read_text())


def test_every_row_checks_seed_resume_and_the_cpu(device_check, tmp_path):
    rc, report = make_report(device_check, tmp_path, "--timing", "--timing-dataset", "digits", "--timing-iters", "1",
                             "--timing-epochs", "2", "--timing-config", TINY_POSTER)
    assert rc == 0 and [r["method"] for r in report["methods"]] == ["dm", "podd"]
    for row in report["methods"]:
        # on the CPU both runs of a seed, and a resumed run, are the straight run bit for bit
        assert row["finite"] and row["same_seed"] and row["max_diff"] == 0.0 and row["resume"] is True
        assert row["vs_cpu"] == 0.0 and row["on"] == "cpu" and 0 <= row["acc"] <= 100
    timing = report["timing"]
    assert timing["s_per_iteration"] >= 0 and timing["crops"] > 0
    # both rounded: s_per_iteration to 3 decimals (x 150: up to 0.075), the projection to 1 (0.05)
    assert timing["projected_poster_s"] == pytest.approx(150 * timing["s_per_iteration"], abs=0.13)
    env = report["environment"]
    assert env["device"] == "cpu" and env["cudnn_conv_tf32"] is torch.backends.cudnn.allow_tf32
    assert env["matmul_tf32"] is False and env["cudnn_deterministic"] is False  # torch's defaults


def test_a_failing_method_is_a_row_and_the_others_run(device_check, tmp_path, monkeypatch):
    real = device_check.check_method

    def broken(name, *args):
        if name == "dm":
            raise RuntimeError("CUDA error: an illegal memory access")
        return real(name, *args)

    monkeypatch.setattr(device_check, "check_method", broken)
    rc, report = make_report(device_check, tmp_path)
    assert rc == 1
    assert report["methods"][0] == {"method": "dm", "error": "RuntimeError: CUDA error: an illegal memory access"}
    assert report["methods"][1]["method"] == "podd" and report["methods"][1]["resume"] is True


def test_a_missing_timing_dataset_is_said_and_the_rows_kept(device_check, tmp_path):
    rc, report = make_report(device_check, tmp_path, "--timing", "--timing-root", str(tmp_path / "none"))
    assert rc == 0 and len(report["methods"]) == 2
    assert report["timing"]["error"].startswith("DatasetNotFoundError: fashion-mnist: ")
    assert str(tmp_path / "none" / "train-images-idx3-ubyte") in report["timing"]["error"]
