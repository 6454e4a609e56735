"""What ``atlas lineage recover`` says of an AWQ model read with its rescaling undone (lineage.unsmoothed)."""

from modelatlas.cli.main import main
from modelatlas.zoo.awq import CONFIG, awq_model, save_folder
from modelatlas.zoo.awq import llama_model as make_llama


def test_an_awq_stand_in_is_noted_with_its_relative(tmp_path, capsys):
    base = make_llama(0)
    ft = make_llama(1, base, 0.05)
    save_folder(tmp_path / "base", base)
    save_folder(tmp_path / "c1", make_llama(2, ft, 0.05))
    save_folder(tmp_path / "ft-awq", awq_model(ft), CONFIG)
    assert main(["lineage", "recover", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "ft-awq: AWQ-rescaled, compared with its rescaling undone by the factors" in err
    assert "ft-awq: quantized (awq-int4), and no model given is the one it was quantized from" in err
