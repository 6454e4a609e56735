"""A distillation checkpoint damaged on disk or edited since it was saved is refused with one CheckpointError
naming the file, never continued silently from other values, never a traceback (fuzzed in session 40:
tests/cli/test_fuzz_outputs.py). checkpoint.json records SHA-256 digests of its tensor file and of the fields a
resume continues from; an older checkpoint, without them, still resumes. A saved set or result.json of values of
another type is named too."""

import json

import pytest
import torch

from modelatlas.distill.loop import OuterLoop
from modelatlas.errors import CheckpointError


def make_problem():
    from tests.distill.test_loop_result import make_problem as problem

    syn, opt, step = problem()
    return step, {"synthetic": syn, "optimizer": opt}


def make_saved(folder):
    """A run of 4 iterations stopped after 2 (its checkpoint in ``folder``); the images of the 4 never stopped."""
    step, states = make_problem()
    OuterLoop(2, seed=7, checkpoint_dir=folder, checkpoint_every=1).run(step, states)
    step, straight = make_problem()
    OuterLoop(4, seed=7).run(step, straight)
    return straight["synthetic"].images


def make_resumed(folder):
    step, states = make_problem()
    OuterLoop(4, seed=7, checkpoint_dir=folder, checkpoint_every=1, resume=True).run(step, states)
    return states["synthetic"].images


def test_a_checkpoint_resumes_to_the_run_never_stopped_and_records_its_digests(tmp_path):
    straight = make_saved(tmp_path)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert len(meta["tensors_sha256"]) == 64 and len(meta["states_sha256"]) == 64
    assert torch.equal(make_resumed(tmp_path), straight)


def test_an_older_checkpoint_without_digests_still_resumes(tmp_path):
    straight = make_saved(tmp_path)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    del meta["tensors_sha256"], meta["states_sha256"]
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    assert torch.equal(make_resumed(tmp_path), straight)


def test_a_flipped_bit_of_the_tensor_file_is_refused_naming_it(tmp_path):
    """It resumed from the flipped images: a result of other images, said nowhere."""
    make_saved(tmp_path)
    path = tmp_path / "ckpt-2.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # a weight's bits, not the header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ckpt-2\.safetensors: is not the file checkpoint\.json was saved "
                                              r"with \(damaged since: its SHA-256 differs"):
        make_resumed(tmp_path)


@pytest.mark.parametrize("where, value", [(("rng", "python", 5), 7), (("rng", "numpy_pos"), 3)])
def test_an_edited_state_is_refused_naming_checkpoint_json(tmp_path, where, value):
    """An RNG state edited to another valid number resumed silently into other draws."""
    make_saved(tmp_path)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    state = {k: v for k, v in meta["states"]["rng"]["__keys__"]}
    if len(where) == 3:
        state["python"]["__list__"][where[2]] = value
    else:
        state["numpy_pos"] = value
    meta["states"]["rng"]["__keys__"] = [[k, v] for k, v in state.items()]
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: its saved state differs from the one it was "
                                              "written with"):
        make_resumed(tmp_path)


@pytest.mark.parametrize("value, error", [("", "an integer is required"), (2**64, "Python int too large")])
def test_an_rng_state_of_another_type_in_an_older_checkpoint_is_one_line(tmp_path, value, error):
    """An RNG state value that is no 32-bit integer ended in a TypeError or OverflowError traceback."""
    make_saved(tmp_path)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    del meta["states_sha256"]
    state = dict(meta["states"]["rng"]["__keys__"])
    state["python"]["__list__"][3] = value
    meta["states"]["rng"]["__keys__"] = [[k, v] for k, v in state.items()]
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"checkpoint\.json: state 'rng' does not fit this run \({error}"):
        make_resumed(tmp_path)


def test_a_folder_in_place_of_checkpoint_json_is_refused_before_anything_is_written(tmp_path):
    """It was taken for no checkpoint: the run started over, wrote ckpt-1.safetensors, then failed."""
    make_saved(tmp_path)
    (tmp_path / "checkpoint.json").unlink()
    (tmp_path / "checkpoint.json").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(IsADirectoryError) as e:
        make_resumed(tmp_path)
    assert e.value.filename == str(tmp_path / "checkpoint.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_saved_classes_of_an_unsigned_wide_dtype_are_refused_naming_the_file(tmp_path):
    """uint64 classes (a dtype lie in the header, fuzzed) ended `atlas distill eval` in a NotImplementedError
    traceback ("min_all" not implemented for 'UInt64')."""
    from safetensors.torch import load_file, save_file

    from modelatlas.distill.synthetic import SyntheticSet

    SyntheticSet.from_noise((1, 4, 4), 2, 1, torch.Generator().manual_seed(0)).save(tmp_path)
    tensors = load_file(str(tmp_path / "synthetic.safetensors"))
    save_file({**tensors, "classes": tensors["classes"].to(torch.uint64)}, str(tmp_path / "synthetic.safetensors"))
    with pytest.raises(CheckpointError, match=r"synthetic\.safetensors: classes must be 2 integers \(one per image\), "
                                              r"got shape \(2,\) of torch\.uint64"):
        SyntheticSet.load(tmp_path)


def test_a_protocol_momentum_of_null_is_named():
    """A result.json whose evaluation.protocol.momentum is null ended `atlas distill eval` in a TypeError."""
    from modelatlas.distill import EvalProtocol
    from modelatlas.errors import ConfigError

    with pytest.raises(ConfigError, match="eval momentum must be a number, got None"):
        EvalProtocol(momentum=None)
