"""Seeded damage for the checkpoint readers' fuzz tests (tests/weights/test_fuzz_readers.py).

Each ``make_*_model(folder)`` writes one small valid model and returns ``(model path, {damageable file: kind})``;
``make_damage(rng, file, kind)`` damages one such file in place, as a seeded random choice among the mutations
its kind allows, and returns what it did (a one-line description that reproduces nothing by itself: the seed
does). ``check_survives(path)`` opens the model, lists and reads every tensor, and accepts only success or a
one-line CheckpointError naming the file, within a time budget and a memory limit.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import struct
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelatlas.errors import CheckpointError
from modelatlas.weights import open_checkpoint

TENSORS = {"embed.weight": torch.arange(12.0).reshape(4, 3), "head.weight": torch.ones(2, 3, dtype=torch.float16),
           "head.bias": torch.zeros(2, dtype=torch.bfloat16)}
# Values a JSON field may be replaced by: wrong types, lies about sizes, paths out of the folder.
ODD_VALUES = ["x", "", -1, 0, 2**64, 10**15, 2**63 - 1, None, [], {}, [[1, 2]], 1.5, True, "../x", "/etc/passwd",
              [-1, 3], [10**15, 10**15], ["a", 1], float("nan"), float("inf"), -1e308, "a\nb", "F8_E8M0", "I4",
              "model.safetensors.index.json", "model-00001-of-00002.safetensors", "adapter_config.json", "."]
HUGE_INTS = [2**64 - 1, 2**63, 2**63 - 1, 2**32 - 1, 2**31, 10**15, 2**40]


class Hang(Exception):
    """A case ran past its time budget (raised from the alarm)."""


# ---------------------------------------------------------------- valid models


def make_safetensors_model(folder: Path) -> tuple[Path, dict]:
    path = folder / "m.safetensors"
    save_file(TENSORS, str(path))
    return path, {path: "safetensors"}


def make_sharded_model(folder: Path) -> tuple[Path, dict]:
    """A Hugging Face folder of two safetensors shards and their index."""
    return _sharded(folder / "hf", "model", "safetensors", lambda t, path: save_file(t, str(path)), "safetensors",
                    {"total_size": 64})


def _sharded(model: Path, stem: str, ext: str, save, kind: str, metadata: dict) -> tuple[Path, dict]:
    """Folder ``model`` of two shards (``stem-0000k-of-00002.ext``, written by ``save``) and their index; the
    damage kinds of its files (the index "json", the shards ``kind``)."""
    model.mkdir()
    shards = {f"{stem}-00001-of-00002.{ext}": ["embed.weight"], f"{stem}-00002-of-00002.{ext}": ["head.weight", "head.bias"]}
    for shard, names in shards.items():
        save({n: TENSORS[n] for n in names}, model / shard)
    index = model / f"{stem}.{ext}.index.json"
    index.write_text(json.dumps({"metadata": metadata, "weight_map": {n: s for s, names in shards.items() for n in names}}))
    return model, {index: "json", **{model / s: kind for s in shards}}


def make_torch_model(folder: Path, name: str = "m.pt") -> tuple[Path, dict]:
    path = folder / name
    torch.save({"model_state_dict": dict(TENSORS), "epoch": 3}, path)
    return path, {path: "torch"}


def make_legacy_torch_model(folder: Path) -> tuple[Path, dict]:
    """A state dict in torch's legacy (pre-1.6, not zip) format: a pickle, then each storage's element count and
    bytes."""
    path = folder / "legacy.pt"
    torch.save(dict(TENSORS), path, _use_new_zipfile_serialization=False)
    return path, {path: "legacy"}


def make_sharded_bin_model(folder: Path) -> tuple[Path, dict]:
    """A Hugging Face folder of two torch.save shards and their index (pytorch_model.bin.index.json)."""
    return _sharded(folder / "hf-bin", "pytorch_model", "bin", torch.save, "torch", {})


def make_peft_model(folder: Path, fmt: str = "safetensors") -> tuple[Path, dict]:
    """A PEFT LoRA adapter folder: one module's A (r=2, in=3) and B (out=4, r=2)."""
    model = folder / f"adapter-{fmt}"
    model.mkdir()
    config = model / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                                  "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False}))
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.arange(6.0).reshape(2, 3),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.ones(4, 2)}
    if fmt == "safetensors":
        weights = model / "adapter_model.safetensors"
        save_file(tensors, str(weights))
    else:
        weights = model / "adapter_model.bin"
        torch.save(tensors, weights)
    return model, {config: "json", weights: "safetensors" if fmt == "safetensors" else "torch"}


def make_quantized_model(folder: Path, scheme: str) -> tuple[Path, dict]:
    """A Hugging Face folder of one quantized layer (16, 64) stored as ``scheme`` and a plain norm, with the
    config.json its reader takes."""
    from tests.weights.conftest import NF4, make_bnb4, make_bnb8, make_gptq, make_mlx, make_pack_quantized

    from modelatlas.zoo import awq
    from modelatlas.zoo.awq import save_folder

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    scale = w.abs().amax(dim=1, keepdim=True) / 448  # (out, 1) a float8 scale per row
    made = {"gptq": lambda: (make_gptq(w), {"quant_method": "gptq", "bits": 4}),
            "pack-quantized": lambda: (make_pack_quantized(w), None),
            "awq": lambda: (awq.awq_layer(w, group=awq.GROUP), awq.CONFIG),
            "fp8": lambda: ({"layer.weight": (w / scale).to(torch.float8_e4m3fn), "layer.weight_scale": scale}, None),
            "bnb4": lambda: (make_bnb4(w, nested=True, book=NF4), {"quant_method": "bitsandbytes"}),
            "bnb8": lambda: (make_bnb8(w), {"quant_method": "bitsandbytes"}),
            "mlx": lambda: (make_mlx(w, name="layer"), {"quant_method": "mlx", "group_size": 32, "bits": 4})}
    tensors, config = made[scheme]()
    model = save_folder(folder / scheme, {**tensors, "norm.weight": torch.ones(16)}, config)
    files = {model / "model.safetensors": "safetensors"}
    return model, files if config is None else {**files, model / "config.json": "json"}


def make_onnx_model(folder: Path, external: bool = False) -> tuple[Path, dict]:
    """y = x @ W^T with a float initializer W and an int64 one; ``external``: W's bytes in weights.data."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 2])],
        initializer=[numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "W"),
                     numpy_helper.from_array(np.array([3, 2], dtype=np.int64), "shape")])
    model, path = helper.make_model(graph), folder / ("ext.onnx" if external else "m.onnx")
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.data", size_threshold=0)
        return path, {path: "onnx", folder / "weights.data": "bytes"}
    onnx.save_model(model, str(path))
    return path, {path: "onnx"}


def make_gguf_model(folder: Path) -> tuple[Path, dict]:
    """A GGUF file of a float32, a float16 and a Q8_0 tensor (the quantized type's blocks)."""
    import gguf
    import numpy as np

    from modelatlas.zoo.gguf import quantized

    q = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    path = folder / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(32)
    w.add_array("tokenizer.ggml.tokens", ["a", "bc"])
    w.add_array("x.scores", [1.0, 2.0])
    w.add_tensor("f32", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.add_tensor("f16", np.linspace(-1, 1, 8, dtype=np.float16).reshape(2, 4))
    q8, _ = quantized(q, "Q8_0")
    w.add_tensor("q8", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, {path: "gguf"}


# ---------------------------------------------------------------- damage


def make_damage(rng: random.Random, path: Path, kind: str) -> str:
    """Damage ``path`` (a file of ``kind``: safetensors, json, torch, onnx, gguf, bytes) in place; returns what
    was done. A quarter of the damage is generic (truncation, byte flips, huge integers, empty, a folder in its
    place), the rest follows the format's structure."""
    data = path.read_bytes()
    special = _SPECIAL.get(kind)
    if special is None or rng.random() < 0.35:
        return make_byte_damage(rng, path, data, _head_end(path, kind, data))
    return special(rng, path, data)


def make_byte_damage(rng: random.Random, path: Path, data: bytes, head_end: int) -> str:
    choice = rng.choice(["truncate", "truncate", "flip_head", "flip_head", "flip_data", "huge_int", "huge_int",
                         "empty", "folder", "append"])
    if choice == "folder":  # a directory where the file is expected
        path.unlink()
        path.mkdir()
        (path / "x").write_bytes(b"1")
        return f"{path.name}: a folder in place of the file"
    out = bytearray(data)
    if choice == "truncate":
        at = rng.randrange(len(data)) if data else 0
        out = out[:at]
    elif choice in ("flip_head", "flip_data"):
        lo, hi = (0, head_end) if choice == "flip_head" or head_end >= len(data) else (head_end, len(data))
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(lo, max(hi, lo + 1)) % max(len(out), 1)] ^= 1 << rng.randrange(8)
        choice += f" near {lo}..{hi}"
    elif choice == "huge_int":
        at, value = rng.randrange(max(head_end - 8, 1)), rng.choice(HUGE_INTS)
        out[at:at + 8] = struct.pack("<Q", value)[: len(out[at:at + 8])]
        choice += f" {value} at {at}"
    elif choice == "empty":
        out = bytearray()
    else:
        out += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    path.write_bytes(bytes(out))
    return f"{path.name}: {choice} ({len(data)} -> {len(out)} bytes)"


def make_json_damage(rng: random.Random, doc: object) -> tuple[object, str]:
    """``doc`` with one random part replaced by an odd value, deleted, or the whole made another type."""
    paths = list(_json_paths(doc, ()))
    where = rng.choice(paths)
    op = rng.choice(["replace", "replace", "replace", "delete", "rename", "whole"])
    if op == "whole" or not where:
        new = rng.choice(ODD_VALUES + [[doc], "{", 7])
        return new, f"whole document -> {str(new)[:40]}"
    parent = doc
    for key in where[:-1]:
        parent = parent[key]
    if op == "delete":
        del parent[where[-1]]
        return doc, f"deleted {where}"
    if op == "rename" and isinstance(parent, dict):  # a key of another spelling: a newline, empty, metadata's
        new_key = rng.choice(["a\nb", "", "__metadata__", "x" * 300, where[-1] + "\r"])
        parent[new_key] = parent.pop(where[-1])
        return doc, f"renamed {where} to {new_key!r}"
    parent[where[-1]] = value = rng.choice(ODD_VALUES)
    return doc, f"{where} -> {value!r}"


def _json_paths(doc: object, at: tuple):
    yield at
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield from _json_paths(v, (*at, k))


def _damage_json_file(rng: random.Random, path: Path, data: bytes) -> str:
    if rng.random() < 0.15:  # invalid JSON: cut short, or bytes that are no UTF-8
        path.write_bytes(data[: rng.randrange(len(data))] if rng.random() < 0.5 else b"\xff\xfe{" + data)
        return f"{path.name}: invalid JSON"
    doc, what = make_json_damage(rng, json.loads(data))
    path.write_text(json.dumps(doc))
    return f"{path.name}: {what}"


def _damage_safetensors(rng: random.Random, path: Path, data: bytes) -> str:
    (n,) = struct.unpack("<Q", data[:8])
    header, rest = json.loads(data[8:8 + n]), data[8 + n:]
    if rng.random() < 0.3:  # the length field lies
        value = rng.choice([*HUGE_INTS, 0, 1, n - 1, n + 1, len(data)])
        path.write_bytes(struct.pack("<Q", value) + data[8:])
        return f"{path.name}: header length {n} -> {value}"
    if rng.random() < 0.3:  # a consistent lie: another shape of as many values, a dtype of the same width
        name = rng.choice(sorted(k for k in header if k != "__metadata__"))
        meta, what = header[name], f"tensor {name!r} "
        if rng.random() < 0.5:
            n = 1
            for d in meta["shape"]:
                n *= d
            meta["shape"] = rng.choice([meta["shape"][::-1], [n], [1, n], [n, 1, 1], []] if n == 1 else
                                       [meta["shape"][::-1], [n], [1, n], [n, 1, 1]])
            what += f"shape -> {meta['shape']}"
        else:
            meta["dtype"] = rng.choice(_SAME_WIDTH[meta["dtype"]])
            what += f"dtype -> {meta['dtype']}"
        doc = header
    else:
        doc, what = make_json_damage(rng, header)
    raw = json.dumps(doc).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + rest)
    return f"{path.name}: header {what}"


_SAME_WIDTH = {"F32": ["I32", "U32", "F16"], "F16": ["BF16", "I16", "U16", "F32"], "BF16": ["F16", "I16", "U8"],
               "I64": ["F64", "U64"], "F64": ["I64", "U64"], "I32": ["F32", "U32", "I64"], "U32": ["I32", "F32"], "U8": ["I8", "BOOL", "F8_E4M3"],
               "I8": ["U8", "F8_E5M2"], "F8_E4M3": ["U8", "F8_E5M2", "I8"]}


def _damage_torch(rng: random.Random, path: Path, data: bytes) -> str:
    """Rewrite the zip with one member damaged (the pickle's bytes flipped or cut, a storage cut, grown or
    removed), each member's CRC made right again, or the whole file another object torch.save wrote."""
    if rng.random() < 0.25:
        obj = rng.choice(_ODD_STATES)()
        torch.save(obj, path)
        return f"{path.name}: torch.save of {type(obj).__name__} {str(obj)[:40]!r}"
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    name = rng.choice(sorted(members))
    body = bytearray(members[name])
    op = rng.choice(["flip", "flip", "cut", "grow", "drop", "pickle", "pickle", "pickle"])
    if op == "pickle":  # the state dict's pickle made to lie: a size, offset, stride, storage or dtype
        name = next(m for m in members if m.endswith("data.pkl"))
        body, op = make_pickle_lie(rng, members[name])
    elif op == "flip" and body:
        for _ in range(rng.randint(1, 3)):
            body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
    elif op == "cut":
        body = body[: rng.randrange(len(body) + 1)]
    elif op == "grow":
        body += b"\0" * rng.randint(1, 16)
    if op == "drop":
        del members[name]
    else:
        members[name] = bytes(body)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for member, content in members.items():
            z.writestr(member, content)
    path.write_bytes(buf.getvalue())
    return f"{path.name}: zip member {name} {op}"


def make_pickle_lie(rng: random.Random, body: bytes) -> tuple[bytes, str]:
    """``body`` (a pickle torch.save wrote) with one small integer (a size, stride, offset or storage's element
    count) made huge or negative, one storage's class made another dtype's, or one tensor's storage key
    another's."""
    import pickletools

    ops = list(pickletools.genops(body))
    ints = [(pos, 1 + op.arg.n) for op, _, pos in ops if op.name in ("BININT1", "BININT2", "BININT")]
    storages = [(pos, arg) for op, arg, pos in ops if op.name == "GLOBAL" and arg.endswith("Storage")]
    keys = [(pos, arg) for op, arg, pos in ops if op.name == "BINUNICODE" and arg.isdigit()]
    kind = rng.choice(["int", "int", "storage", "key"])
    if kind == "storage" and storages:
        pos, arg = rng.choice(storages)
        new = "torch " + rng.choice(["DoubleStorage", "HalfStorage", "ByteStorage", "LongStorage", "BoolStorage"])
        old = b"c" + arg.replace(" ", "\n").encode() + b"\n"
        return body[:pos] + b"c" + new.replace(" ", "\n").encode() + b"\n" + body[pos + len(old):], f"{arg} -> {new}"
    if kind == "key" and keys:
        pos, arg = rng.choice(keys)
        new = rng.choice([k for _, k in keys] + ["99"])
        old = 5 + len(arg.encode())
        return body[:pos] + b"X" + struct.pack("<I", len(new)) + new.encode() + body[pos + old:], f"key {arg} -> {new}"
    pos, size = rng.choice(ints)
    value = rng.choice([2**31 - 1, -1, -(2**31), 2**40, 10**15, 2**63 - 1, 0, 7])
    raw = value.to_bytes(8, "little", signed=True)
    return body[:pos] + b"\x8a\x08" + raw + body[pos + size:], f"int at {pos} -> {value}"


_ODD_STATES = [lambda: [torch.ones(2)], lambda: {1: torch.ones(2)}, lambda: {"a": 1, "b": "x"}, lambda: None,
               lambda: (torch.ones(2),), lambda: {"state_dict": "x"}, lambda: {"model": [torch.ones(1)]},
               lambda: {"w": torch.ones(1).expand(10**12)}, lambda: {"w": torch.ones(3)[::2]},
               lambda: {"a": {"b": {"c": torch.ones(1)}}}, lambda: torch.ones(3),
               lambda: {"w": torch.ones(2, 3).t()}, lambda: {"": torch.ones(1)}, lambda: {"w": torch.ones(0, 5)}]


def _damage_onnx(rng: random.Random, path: Path, data: bytes) -> str:
    """One initializer's fields made to lie: dims huge or negative, an unknown or other data type, raw bytes cut,
    external data pointing elsewhere, out of the folder, past its file's end."""
    import onnx

    model = onnx.load_model_from_string(data)
    init = rng.choice(list(model.graph.initializer))
    op = rng.choice(["dims", "dims", "type", "raw", "external", "name", "typed", "nodata"])
    if op == "dims":
        del init.dims[:]
        init.dims.extend(rng.choice([[10**15], [2**62, 4], [-1, 3], [], [0], [3, 2], [1, 1, 1, 1, 6]]))
        what = list(init.dims)
    elif op == "type":
        init.data_type = what = rng.choice([0, 8, 999, 16, 17, 23, 11, -5 % 2**31])
    elif op == "raw":
        init.raw_data = what = init.raw_data[: rng.randrange(len(init.raw_data) + 1)] if init.raw_data else b"\1"
    elif op in ("typed", "nodata"):  # values in the typed fields (float_data, int64_data), or nowhere
        what = _onnx_typed(rng, init, op == "typed")
    elif op == "name":
        init.name = what = rng.choice(["", "W", "x" * 1000])
    else:
        what = _onnx_external(rng, init)
    path.write_bytes(model.SerializeToString())
    return f"{path.name}: initializer {op} -> {str(what)[:60]}"


def _onnx_typed(rng: random.Random, init, typed: bool) -> str:
    import numpy as np
    from onnx import TensorProto

    values = np.arange(int(np.prod(init.dims)), dtype=np.float32 if init.data_type == 1 else np.int64)
    init.ClearField("raw_data")
    del init.external_data[:]
    init.data_location = TensorProto.DEFAULT
    if typed:
        count = rng.choice([len(values), 1, len(values) + 5])
        field = init.float_data if values.dtype == np.float32 else init.int64_data
        field.extend(np.resize(values, count).tolist())
    if rng.random() < 0.5:
        del init.dims[:]
        init.dims.extend(rng.choice([[10**15], [2**31, 2**31], [0, 10**15]]))
    return f"{'typed' if typed else 'no'} data, {list(init.dims)}"


def _onnx_external(rng: random.Random, init) -> dict:
    from onnx import TensorProto

    fields = {e.key: e.value for e in init.external_data} or {"location": "weights.data", "offset": "0",
                                                              "length": str(len(init.raw_data) or 8)}
    key = rng.choice(["location", "offset", "length"])
    fields[key] = rng.choice({"location": ["../x", "/etc/passwd", "missing.bin", "", "m.onnx", "."],
                              "offset": ["-8", "x", str(10**15), "1"],
                              "length": ["-1", "x", str(10**15), "0", "3"]}[key])
    init.ClearField("raw_data")
    del init.external_data[:]
    for k, v in fields.items():
        entry = init.external_data.add()
        entry.key, entry.value = k, v
    init.data_location = TensorProto.EXTERNAL
    return fields


def _damage_gguf(rng: random.Random, path: Path, data: bytes) -> str:
    """A count in the fixed header, or a tensor info's dims, type or offset, set to a lie."""
    out = bytearray(data)
    if rng.random() < 0.3:
        at = rng.choice([4, 8, 16])  # version, tensor count, metadata count
        value = rng.choice(HUGE_INTS + [0, 1, 4]) % (2**32 if at == 4 else 2**64)
        out[at:at + (4 if at == 4 else 8)] = struct.pack("<I" if at == 4 else "<Q", value)
        path.write_bytes(bytes(out))
        return f"{path.name}: header field at {at} -> {value}"
    if rng.random() < 0.3:
        return _damage_gguf_kv(rng, path, out)
    name = rng.choice([b"f32", b"f16", b"q8"])
    p = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, p)
    field = rng.choice(["n_dims", "dim", "type", "offset"])
    if field == "n_dims":
        value = rng.choice([0, 5, 2**31, 2**32 - 1])
        struct.pack_into("<I", out, p, value)
    elif field == "dim":
        value = rng.choice(HUGE_INTS + [0, 1, 33])
        struct.pack_into("<Q", out, p + 4 + 8 * rng.randrange(n_dims), value)
    elif field == "type":
        value = rng.choice([0, 1, 8, 2, 12, 30, 999, 2**32 - 1])
        struct.pack_into("<I", out, p + 4 + 8 * n_dims, value)
    else:
        value = rng.choice(HUGE_INTS + [1, 32, 2**64 - 32])
        struct.pack_into("<Q", out, p + 8 + 8 * n_dims, value)
    path.write_bytes(bytes(out))
    return f"{path.name}: tensor {name.decode()} {field} -> {value}"


def _damage_gguf_kv(rng: random.Random, path: Path, out: bytearray) -> str:
    """A metadata value's type, the alignment, or an array's item type or count set to a lie."""
    key = rng.choice([b"general.alignment", b"general.architecture", b"tokenizer.ggml.tokens", b"x.scores"])
    p = bytes(out).index(struct.pack("<Q", len(key)) + key) + 8 + len(key)  # the value's type, then the value
    field = rng.choice(["type", "value", "value"])
    if field == "type":
        value = rng.choice([0, 4, 6, 8, 9, 12, 13, 99, 2**32 - 1])
        struct.pack_into("<I", out, p, value)
    elif key == b"general.alignment":
        value = rng.choice([0, 3, 1, 2**31, 2**32 - 1, 64])
        struct.pack_into("<I", out, p + 4, value)
    else:  # a string's length, an array's item type then count
        at, value = rng.choice([(p + 4, rng.choice(HUGE_INTS)), (p + 8, rng.choice(HUGE_INTS)),
                                (p + 4, rng.choice([0, 8, 9, 99]))])
        struct.pack_into("<I" if value < 100 else "<Q", out, at, value)
    path.write_bytes(bytes(out))
    return f"{path.name}: key {key.decode()} {field} -> {value}"


def _damage_legacy(rng: random.Random, path: Path, data: bytes) -> str:
    """The object pickle (the fourth) of a legacy torch file made to lie (:func:`make_pickle_lie`)."""
    import pickletools

    f = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info
        list(pickletools.genops(f))
    start = f.tell()
    list(pickletools.genops(f))
    body, what = make_pickle_lie(rng, data[start:f.tell()])
    path.write_bytes(data[:start] + body + data[f.tell():])
    return f"{path.name}: object pickle {what}"


_SPECIAL = {"safetensors": _damage_safetensors, "legacy": _damage_legacy, "json": _damage_json_file, "torch": _damage_torch,
            "onnx": _damage_onnx, "gguf": _damage_gguf}


def _head_end(path: Path, kind: str, data: bytes) -> int:
    """Where the header ends (tensor data begins), for flips aimed at one or the other."""
    if kind == "safetensors" and len(data) >= 8:
        return 8 + struct.unpack("<Q", data[:8])[0]
    if kind == "gguf":
        return len(data) - 160  # the data section: f32 24 (+8) + f16 16 (+16) + q8 68 (+28)
    return len(data) // 2


# ---------------------------------------------------------------- checks


@contextmanager
def check_limits(seconds: float, memory_bytes: int):
    """Raise Hang after ``seconds``; refuse allocations of more than ``memory_bytes`` beyond what the process
    already maps (RLIMIT_AS): a header believed about 10^15 elements fails here, not in the machine. Linux only
    (elsewhere no limit: the cases still run, and a refusal's message is still checked)."""
    def alarm(*_):
        raise Hang(f"ran past {seconds} s")

    limited = sys.platform.startswith("linux")
    if limited:
        import resource

        _warm_threads()
        old_handler, old_limit = signal.signal(signal.SIGALRM, alarm), resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (_mapped() + memory_bytes, old_limit[1]))
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if limited:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
            resource.setrlimit(resource.RLIMIT_AS, old_limit)


def _warm_threads() -> None:
    """Start torch's worker threads before a limit is set: each maps a stack and a malloc arena (64 MB of address
    space), which on a machine of many cores would count against the limit of the first case that used them."""
    (torch.ones(256, 256) @ torch.ones(256, 256)).sum()
    torch.ones(1 << 20).add_(1).sum()


def _mapped() -> int:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    return kb * 1024


def check_survives(path: Path, damaged: Path, seconds: float = 5.0, names_file: bool = True) -> str:
    """Open ``path``, list and read every tensor: returns "read" or the CheckpointError's message. Anything else
    (another exception, a hang, a huge allocation, a read of another shape than listed) raises, naming
    ``damaged`` (the file hurt). The message must be one line naming the damaged file (``names_file``; else the
    damaged file or the model: a quantized layer's tensors that do not fit together are named by the layer)."""
    with check_limits(seconds, 2 * 2**30):
        try:
            with open_checkpoint(path) as ck:
                for info in ck.tensors():
                    check_tensor(ck, info)
            return "read"
        except CheckpointError as e:
            message = str(e)
    assert "\n" not in message, f"two lines: {message!r}"
    assert "allocate" not in message and "MemoryError" not in message, f"believed a size it was told: {message!r}"
    named = damaged.name in message or (not names_file and str(path) in message)
    assert named, f"does not name {damaged.name}: {message!r}"
    return message


def check_tensor(ck, info) -> None:
    """Read tensor ``info`` whole and by rows (first, last: what a copy test samples) and ask for its rounding and
    copy tests; the two reads agree and have the shape listed."""
    x = ck.read(info.name)
    assert tuple(x.shape) == info.shape, f"{info.name}: read {tuple(x.shape)}, listed {info.shape}"
    if x.numel():
        flat = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)  # (n, m)
        rows = torch.tensor(sorted({0, flat.shape[0] - 1}))
        got = ck.read_rows(info.name, rows)
        assert torch.equal(got.view(torch.uint8), flat[rows].contiguous().view(torch.uint8)), f"{info.name}: rows"
    if x.is_floating_point():  # the copy tests and rounding of quantized layers (None for plain ones)
        ck.rounding_variance(info.name, x), ck.rounding_moments(info.name), ck.least_squares(info.name)
        ck.requantized_match(info.name, x), ck.grid_match(info.name, x), ck.grid_position(info.name, x)


def make_fresh(folder: Path, make) -> tuple[Path, dict]:
    """A new folder under ``folder`` holding a fresh valid model of ``make``."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return make(folder)


def check_cases(name: str, cases: range, run_case, ok: str) -> dict:
    """Run every case of ``cases``: ``run_case(i)`` damages case i and returns (what it did, a function that
    reads the damaged input back and returns ``ok`` or the refusal); any other outcome of that function
    (another exception, a hang) is a finding. Every failure is listed at once (case, damage, what broke);
    returns the counts of ``ok`` and "refused"."""
    failures, outcomes = [], {ok: 0, "refused": 0}
    for i in cases:
        what, read_back = run_case(i)
        try:
            outcome = read_back()
        except (Exception, Hang) as e:  # noqa: BLE001 - every other outcome is the finding
            failures.append(f"case {i} ({what}): {type(e).__name__}: {str(e)[:300]}")
            continue
        outcomes[ok if outcome == ok else "refused"] += 1
    assert not failures, f"{len(failures)} of {len(cases)} {name} cases broke:\n" + "\n".join(failures)
    return outcomes


def make_case_seed(fmt: str, i: int) -> int:
    return int.from_bytes(os.fsencode(fmt)[:6], "little") * 1000 + i
