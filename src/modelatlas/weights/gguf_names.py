"""A Hugging Face transformer checkpoint seen under llama.cpp's GGUF tensor names and layout, so that a model
and its GGUF conversions (F16, Q8_0, Q4_K_M, ...) can be compared tensor by tensor.

llama.cpp's ``convert_hf_to_gguf.py`` renames every tensor (``model.layers.0.self_attn.q_proj.weight`` ->
``blk.0.attn_q.weight``, through ``gguf.get_tensor_name_map``) and, for the llama family, permutes the rows
of the query and key projections so that rotary embeddings pair neighbouring values instead of the two halves
of each head (``LlamaModel.permute``: per head, rows ``(2, d/2)`` -> ``(d/2, 2)``). :class:`GGUFNamedView`
applies the same renaming and the same row permutation on read, so its tensors equal the converter's before
it rounds them. Only architectures whose conversion is exactly that are listed (:data:`CONVERSIONS`); others
(fused or transposed weights, Gemma's norms stored +1, stacked experts) are not mapped. Reading a tensor costs
what reading it from the checkpoint does, plus one row permutation (O(n m)).
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from modelatlas.weights.base import Checkpoint, TensorInfo, named_by_folder

# Hugging Face ``architectures[0]`` -> (llama.cpp architecture, whether q/k rows are permuted), as
# convert_hf_to_gguf.py registers them (conversion/llama.py: LlamaModel.undo_permute; conversion/qwen.py).
CONVERSIONS = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
_MAX_CONFIG_BYTES = 1 << 20  # a transformers config.json is a few KB


def hf_config(ckpt: Checkpoint) -> dict | None:
    """The ``config.json`` saved with a Hugging Face model (a model folder, or ``model.safetensors`` beside it);
    None when there is none or it is not a readable JSON object (the model is then simply not mapped)."""
    path = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent if named_by_folder(ckpt.path) else None
    if path is None:
        return None
    try:
        with open(path / "config.json", "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
        config = json.loads(raw) if len(raw) <= _MAX_CONFIG_BYTES else None
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def conversion_of(config: dict) -> tuple[str, bool, int | None, int | None] | None:
    """(llama.cpp architecture, q/k permuted, heads, key/value heads) for a transformers config, or None when
    its architecture is not one :data:`CONVERSIONS` maps."""
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch not in CONVERSIONS:
        return None
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads", heads)
    heads, kv = (h if isinstance(h, int) and not isinstance(h, bool) and h > 0 else None for h in (heads, kv))
    return (*CONVERSIONS[arch], heads, kv)


def gguf_view(ckpt: Checkpoint, arch: str, heads: int | None = None, kv_heads: int | None = None
              ) -> GGUFNamedView | None:
    """``ckpt`` under the GGUF names of architecture ``arch`` when its config.json says it converts to that
    architecture (and, where given, with these head counts); else None."""
    config = hf_config(ckpt)
    conv = conversion_of(config) if config is not None else None
    if conv is None or conv[0] != arch or (conv[1] and None in conv[2:]):  # permuting needs the head counts
        return None
    if (heads is not None and heads != conv[2]) or (kv_heads is not None and kv_heads != conv[3]):
        return None
    return GGUFNamedView.build(ckpt, arch, conv[2:] if conv[1] else None, int(config.get("num_hidden_layers", 0)))


class GGUFNamedView(Checkpoint):
    """A checkpoint's tensors under GGUF names, q/k rows permuted as llama.cpp's converter does
    (``permute_heads``: (heads, kv_heads), or None for architectures that keep the row order)."""

    def __init__(self, ckpt: Checkpoint, names: dict[str, str], arch: str, permute_heads: tuple | None):
        super().__init__(ckpt.path, ckpt.name)
        self.format, self.kind, self.source = ckpt.format, ckpt.kind, ckpt
        self.gguf_architecture = arch
        self._names, self._heads = names, permute_heads  # GGUF name -> the checkpoint's own name

    @classmethod
    def build(cls, ckpt: Checkpoint, arch: str, permute_heads: tuple | None, blocks: int) -> GGUFNamedView | None:
        """The view, or None when a tensor name does not map or two map to one GGUF name."""
        table = _name_table(arch, max(blocks, _blocks(ckpt)))
        if table is None:
            return None
        names = {}
        for name in ckpt.keys():
            if name.endswith(".rotary_emb.inv_freq"):  # a buffer the converter drops
                continue
            new = table.get_name(name, try_suffixes=(".weight", ".bias"))
            if new is None or not new.endswith((".weight", ".bias")) or new in names:
                return None
            names[new] = name
        return cls(ckpt, names, arch, permute_heads) if names else None

    def _infos(self) -> list[TensorInfo]:
        return [TensorInfo(new, self.source.info(old).shape, self.source.info(old).dtype)
                for new, old in self._names.items()]

    def _read(self, name: str) -> torch.Tensor:
        x = self.source.read(self._names[name])
        if self._heads is None or not name.endswith((".attn_q.weight", ".attn_k.weight")):
            return x
        heads = self._heads[0] if name.endswith(".attn_q.weight") else self._heads[1]
        return permute_rows(x, heads)

    def prefetch(self, name: str) -> None:
        self.source.prefetch(self._names[name])

    def close(self) -> None:
        self.source.close()


@lru_cache(maxsize=8)
def _name_table(arch: str, blocks: int):
    """gguf's HF -> GGUF name table of ``arch`` for ``blocks`` blocks (~30 ms to build at 80 blocks, so one
    per architecture and depth, not one per model); None for an architecture gguf does not know."""
    import gguf

    kinds = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(kinds[arch], blocks) if arch in kinds else None


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head of d rows, row ``a * d/2 + b`` moves to ``b * 2 + a``
    (``LlamaModel.permute``); a weight whose rows do not split into heads of even size is returned unchanged."""
    n = w.shape[0]
    if heads <= 0 or n % (2 * heads):
        return w
    return w.reshape(heads, 2, n // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (h, 2, d/2, ...) -> (n, ...)


def _blocks(ckpt: Checkpoint) -> int:
    """1 + the largest block index in names like ``model.layers.<i>.``; 0 when there is none."""
    import re

    found = [int(m.group(1)) for n in ckpt.keys() if (m := re.search(r"\.layers\.(\d+)\.", n))]
    return max(found) + 1 if found else 0
