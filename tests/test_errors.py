"""Tests of modelatlas.errors: the messages the CLI shows for a refused resume."""

from modelatlas.errors import SettingsMismatchError


def make_mismatch(saved, now=8) -> SettingsMismatchError:
    return SettingsMismatchError("out/state.json", "rank_u", saved, now, "train without --resume to start over")


def test_with_flag_names_the_flag_and_the_value_that_continues():
    assert make_mismatch(32).with_flag("--rank") == (
        "out/state.json: cannot resume: --rank was 32 in the interrupted run, now 8; rerun with --rank 32 to "
        "continue it, or train without --resume to start over")


def test_with_flag_suggests_no_value_for_a_setting_the_run_did_not_record():
    # a state saved before the key was recorded (saved None): "rerun with --rank null" is no value the flag takes
    text = make_mismatch(None).with_flag("--rank")
    assert "null to continue" not in text
    assert text.endswith("rerun with the same settings, or train without --resume to start over")


def test_an_error_naming_a_url_hides_its_password_and_signed_query_values():
    # `https://user:pass@host/...` was printed whole in every error about the model (the HTTP review, session 37)
    from modelatlas.errors import CheckpointError, redacted

    err = CheckpointError("https://me:s3cret@host:8080/a//m.safetensors?X-Amz-Signature=abc&x=1&download", "HTTP 404")
    assert str(err) == "https://me:***@host:8080/a//m.safetensors?X-Amz-Signature=***&x=1&download: HTTP 404"
    assert "s3cret" not in str(err) and "abc" not in str(err)
    assert redacted("https://host/m.safetensors?token=") == "https://host/m.safetensors?token="  # nothing to hide
    assert redacted("https://user@host/m") == "https://user@host/m" and redacted("hf://org/m") == "hf://org/m"
