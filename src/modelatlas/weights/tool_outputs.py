"""modelatlas's own outputs given where models are expected: an atlas (atlas.json, atlas.html, its
embeddings), ProbeX experts, a distilled set, a lineage forest JSON. Their safetensors files read as models and
their other files as no format at all ("unknown checkpoint format"); these say what the path is and what to give."""

from __future__ import annotations

from pathlib import Path

from modelatlas.errors import CheckpointError

# Folders modelatlas writes that hold safetensors files which are not models: marker file -> what the folder is
TOOL_OUTPUTS = {"atlas.json": "an atlas (`atlas index build`)", "synthetic.json": "a distilled set (`atlas distill`)"}
EXPERTS = "ProbeX experts (`atlas probex train`)"
GIVE = "give the models' files or folder"


def tool_output(folder: Path) -> str | None:
    """What ``folder`` is when modelatlas wrote it (an atlas, experts, a distilled set), else None. Two stats."""
    what = next((w for marker, w in TOOL_OUTPUTS.items() if (folder / marker).is_file()), None)
    if what is None and (folder / "index.json").is_file() and (folder / "experts").is_dir():
        what = EXPERTS
    return what


def refuse_tool_output(folder: Path) -> None:
    """A CheckpointError when ``folder`` is an output of modelatlas (an atlas, experts, a distilled set):
    its embeddings / synthetic images are safetensors files, but not models."""
    what = tool_output(folder)
    if what is not None:
        raise CheckpointError(folder, f"this folder is {what}, not a folder of models; {GIVE} (an atlas lists "
                                      "its models' paths in atlas.json)")


def refuse_tool_file(path: Path) -> None:
    """A CheckpointError when the file ``path``, readable as a model (an atlas's embeddings.safetensors, a
    distilled set's images), lies directly in a folder modelatlas wrote: it was read as a model of two tensors,
    'no tensor named ...'. The folders such outputs go to hold nothing else (``atlas index build`` refuses
    others)."""
    what = tool_output(path.parent)
    if what is not None:
        raise CheckpointError(path, f"part of {what} {path.parent}, not a model; {GIVE}")


def tool_file_hint(path: Path) -> str:
    """'; <name> is ...' for a file no reader opens that modelatlas wrote (an atlas's page, an experts index, a
    forest JSON), naming what to give instead; "" for any other file."""
    from modelatlas.atomic import peek_json_object

    if path.name in TOOL_OUTPUTS:
        return f"; {path.name} is the index of {TOOL_OUTPUTS[path.name]}, not a model: {GIVE}"
    what = tool_output(path.parent)
    if what is not None:
        return f"; {path.name} is part of {what} {path.parent}, not a model: {GIVE}"
    data = peek_json_object(path) if path.suffix.lower() == ".json" and path.stat().st_size < 2**26 else None
    if data is not None and {"nodes", "edges", "decisions"} <= data.keys():
        return (f"; {path.name} is a lineage forest (`atlas lineage recover --out`), which names models but not their "
                f"files: {GIVE}")
    return ""
