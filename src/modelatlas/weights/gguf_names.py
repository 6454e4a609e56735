"""A Hugging Face transformer checkpoint seen under llama.cpp's GGUF tensor names and layout, so that a model
and its GGUF conversions (F16, Q8_0, Q4_K_M, ...) can be compared tensor by tensor.

llama.cpp's ``convert_hf_to_gguf.py`` renames every tensor (``model.layers.0.self_attn.q_proj.weight`` ->
``blk.0.attn_q.weight``, through ``gguf.get_tensor_name_map``) and, for some families, changes its values in
a fixed way: the llama family permutes the rows of the query and key projections (and their biases) so that
rotary embeddings pair neighbouring values instead of the two halves of each head (``LlamaModel.permute``: per
head, rows ``(2, d/2)`` -> ``(d/2, 2)``); Gemma stores every ``norm.weight`` plus 1 (its RMSNorm scales by ``1 + w``);
GPT-2 stores its ``Conv1D`` weights transposed; Falcon regroups the rows of its fused query/key/value weight;
Gemma 3 cuts the embedding to the tokenizer's size. :class:`GGUFNamedView` applies the same renaming and the
same transforms on read (:class:`Conversion`), so its tensors equal the converter's before it rounds them.
Only architectures whose conversion is exactly that are listed (:data:`CONVERSIONS`, each checked against the
converter by bench/lineage_hf_gguf.py); others (stacked experts, per-head norms stacked into one tensor,
multimodal models) are not mapped. Reading a tensor costs what reading it from the checkpoint does, plus one
O(n m) transform where there is one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from modelatlas.weights.base import Checkpoint, TensorInfo, named_by_folder


@dataclass(frozen=True)
class Conversion:
    """What ``convert_hf_to_gguf.py`` does to one Hugging Face architecture besides renaming."""

    arch: str  # llama.cpp architecture (``general.architecture`` of the GGUF file)
    permute_qk: bool = False  # q/k rows per head (2, d/2) -> (d/2, 2) (LlamaModel.permute)
    permute_qk_bias: bool = False  # q/k biases too (LlamaModel.modify_tensors; OLMo's converter: weights only)
    norm_shift: float = 0.0  # added to every ``*norm.weight`` (Gemma: RMSNorm scales by 1 + w)
    transposed: tuple[str, ...] = ()  # name endings stored transposed (GPT-2's Conv1D weights)
    dropped: tuple[str, ...] = ()  # name endings the converter leaves out
    regroup_qkv: bool = False  # Falcon: fused qkv rows from kv groups (q.., k, v) to (all q, all k, all v)
    tokenizer_rows: bool = False  # Gemma 3: token_embd cut to the tokenizer's size


# Hugging Face ``architectures[0]`` -> its conversion, as convert_hf_to_gguf.py registers it (conversion/*.py:
# llama, qwen, gemma, phi, stablelm, starcoder, olmo, gpt2, falcon). GPT-2's attention masks (``attn.bias``)
# are buffers, not weights; Gemma and Gemma 2 skip ``lm_head.weight`` (tied to the embedding).
_GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
CONVERSIONS = {
    "LlamaForCausalLM": Conversion("llama", permute_qk=True, permute_qk_bias=True),
    "MistralForCausalLM": Conversion("llama", permute_qk=True, permute_qk_bias=True),
    "Qwen2ForCausalLM": Conversion("qwen2"),
    "Qwen3ForCausalLM": Conversion("qwen3"),
    "GemmaForCausalLM": Conversion("gemma", norm_shift=1.0, dropped=("lm_head.weight",)),
    "Gemma2ForCausalLM": Conversion("gemma2", norm_shift=1.0, dropped=("lm_head.weight",)),
    "Gemma3ForCausalLM": Conversion("gemma3", norm_shift=1.0, tokenizer_rows=True),
    "Phi3ForCausalLM": Conversion("phi3"),  # fused qkv_proj / gate_up_proj stay fused: attn_qkv, ffn_up
    "StableLmForCausalLM": Conversion("stablelm"),  # per-head q/k norms (stacked by the converter): unmapped
    "Starcoder2ForCausalLM": Conversion("starcoder2"),
    "OlmoForCausalLM": Conversion("olmo", permute_qk=True),
    "Olmo2ForCausalLM": Conversion("olmo2"),
    "Olmo3ForCausalLM": Conversion("olmo2"),
    "GPT2LMHeadModel": Conversion("gpt2", transposed=_GPT2_CONV1D, dropped=(".attn.bias", ".attn.masked_bias")),
    "FalconForCausalLM": Conversion("falcon", regroup_qkv=True),
}
_SKIPPED = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")  # every architecture's
_HEADS, _KV_HEADS = ("num_attention_heads", "n_head", "n_heads"), ("num_key_value_heads", "n_kv_heads",
                                                                  "num_kv_heads", "n_head_kv")
_BLOCKS = ("n_layers", "num_hidden_layers", "n_layer", "num_layers")
_MAX_BLOCKS = 1024  # the deepest released transformers have ~130 blocks; gguf's table costs ~1 ms per block
_MAX_CONFIG_BYTES = 1 << 20  # a transformers config.json is a few KB
_MAX_TOKENIZER_BYTES = 1 << 28  # Gemma 3's tokenizer.json is ~33 MB


def model_folder(ckpt: Checkpoint) -> Path | None:
    """The folder of a Hugging Face model (a model folder or hub cache snapshot, or the folder of its
    ``model.safetensors``); None for a file that is not named after its folder."""
    return ckpt.path if ckpt.path.is_dir() else ckpt.path.parent if named_by_folder(ckpt.path) else None


def hf_config(ckpt: Checkpoint) -> dict | None:
    """The ``config.json`` saved with a Hugging Face model (:func:`model_folder`); None when there is none or it
    is not a readable JSON object (the model is then simply not mapped)."""
    folder = model_folder(ckpt)
    config = _json(folder / "config.json", _MAX_CONFIG_BYTES) if folder is not None else None
    return config if isinstance(config, dict) else None


def _json(path: Path, limit: int):
    """The JSON value in ``path``; None when it is missing, unreadable, not JSON or over ``limit`` bytes."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
        return json.loads(raw) if len(raw) <= limit else None
    except (OSError, ValueError, RecursionError):  # RecursionError: brackets nested a few thousand deep
        return None


def conversion_of(config: dict) -> tuple[Conversion, int | None, int | None] | None:
    """(conversion, heads, key/value heads) for a transformers config, heads read as the converter reads
    them; None when its architecture is not one :data:`CONVERSIONS` maps."""
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch not in CONVERSIONS:
        return None
    conv = CONVERSIONS[arch]
    heads = _first_count(config, _HEADS)
    kv = _first_count(config, _KV_HEADS)
    if kv is None and next((k for k in _KV_HEADS if k in config), None) is None:
        kv = 1 if conv.regroup_qkv else heads  # Falcon's converter: one (multi-query); others: as many as heads
    return conv, heads, kv


def _first_count(config: dict, keys: tuple[str, ...]) -> int | None:
    """The value of the first of ``keys`` in ``config`` when it is a positive whole number (not a bool)."""
    value = next((config[k] for k in keys if k in config), None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def gguf_view(ckpt: Checkpoint, arch: str, heads: int | None = None, kv_heads: int | None = None
              ) -> GGUFNamedView | None:
    """``ckpt`` under the GGUF names of architecture ``arch`` when its config.json says it converts to that
    architecture (and, where given, with these head counts); else None."""
    view = gguf_attempt(ckpt, arch, heads, kv_heads)
    return view if isinstance(view, GGUFNamedView) else None


def gguf_attempt(ckpt: Checkpoint, arch: str, heads: int | None = None, kv_heads: int | None = None
                 ) -> GGUFNamedView | str | None:
    """:func:`gguf_view`'s view; or, for a model whose config.json converts to ``arch`` but cannot be shown
    under its names, why (a str, for lineage's decisions); None for a model of another architecture."""
    config = hf_config(ckpt)
    found = conversion_of(config) if config is not None else None
    if found is None or found[0].arch != arch:
        return None
    conv, counts = found[0], found[1:]
    if (conv.permute_qk or conv.regroup_qkv) and None in counts:  # the transform needs the head counts
        return "config.json gives no usable attention / key-value head count, which the conversion needs"
    if (heads is not None and heads != counts[0]) or (kv_heads is not None and kv_heads != counts[1]):
        return f"its head counts {counts} are not the GGUF files' {(heads, kv_heads)}"
    rows = tokenizer_size(model_folder(ckpt), config) if conv.tokenizer_rows else None
    if conv.tokenizer_rows and rows is None:  # the converter cannot convert it either
        return "no readable tokenizer.model / tokenizer.json to cut the embedding to, as the conversion does"
    blocks = _first_count(config, _BLOCKS) or 0
    return GGUFNamedView.build(ckpt, conv, counts, blocks, rows)


def tokenizer_size(folder: Path, config: dict) -> int | None:
    """Gemma 3's converter keeps this many embedding rows: ``vocab_size`` of the config with a SentencePiece
    ``tokenizer.model`` (its vocabulary is padded to that size), else the entries of ``tokenizer.json``'s
    vocabulary plus its added tokens; None when neither is readable."""
    if (folder / "tokenizer.model").is_file():
        return _first_count(config, ("vocab_size",))
    tok = _json(folder / "tokenizer.json", _MAX_TOKENIZER_BYTES)
    try:
        vocab, added = tok["model"]["vocab"], tok["added_tokens"]
    except (TypeError, KeyError):  # no tokenizer.json, or not a tokenizers one
        return None
    return len(vocab) + len(added) if isinstance(vocab, (dict, list)) and isinstance(added, list) else None


class GGUFNamedView(Checkpoint):
    """A checkpoint's tensors under GGUF names, transformed as llama.cpp's converter does (``conversion``;
    ``heads``: (heads, key/value heads); ``rows``: the embedding rows kept, or None for all)."""

    def __init__(self, ckpt: Checkpoint, names: dict[str, str], conversion: Conversion, heads: tuple,
                 rows: int | None = None):
        super().__init__(ckpt.path, ckpt.name)
        self.format, self.kind, self.source = ckpt.format, ckpt.kind, ckpt
        self.conversion, self.gguf_architecture = conversion, conversion.arch
        self._names, self._heads, self._rows = names, heads, rows  # GGUF name -> the checkpoint's own name

    @classmethod
    def build(cls, ckpt: Checkpoint, conversion: Conversion, heads: tuple, blocks: int, rows: int | None = None
              ) -> GGUFNamedView | str:
        """The view, or why there is none (a str): a tensor name does not map or two map to one GGUF name, or
        the config or a name says more than _MAX_BLOCKS blocks (a table that deep: minutes and gigabytes)."""
        blocks = max(blocks, _blocks(ckpt))
        if blocks > _MAX_BLOCKS:
            return f"{blocks} blocks, more than the {_MAX_BLOCKS} mapped"
        table = _name_table(conversion.arch, blocks)
        if table is None:
            return f"gguf has no tensor-name table for {conversion.arch}"
        names = {}
        for name in ckpt.keys():
            if name.endswith(_SKIPPED + conversion.dropped):  # buffers and tensors the converter drops
                continue
            new = table.get_name(name, try_suffixes=(".weight", ".bias"))
            if new is None or not new.endswith((".weight", ".bias")) or new in names:
                return f"tensor {name} has no GGUF name of its own"
            names[new] = name
        return cls(ckpt, names, conversion, heads, rows) if names else "no tensor to map"

    def _infos(self) -> list[TensorInfo]:
        out = []
        for new, old in self._names.items():
            info, conv = self.source.info(old), self.conversion
            shape = tuple(info.shape)
            if old.endswith(conv.transposed) and len(shape) == 2:
                shape = shape[::-1]
            if new == "token_embd.weight" and self._rows is not None and shape:
                shape = (min(shape[0], self._rows), *shape[1:])
            shifted = conv.norm_shift and old.endswith("norm.weight") and info.dtype not in ("float16", "float32")
            out.append(TensorInfo(new, shape, "float32" if shifted else info.dtype))
        return out

    def _read(self, name: str) -> torch.Tensor:
        old, conv = self._names[name], self.conversion
        x = self.source.read(old)
        if old.endswith(conv.transposed) and x.ndim == 2:
            x = x.t().contiguous()
        x = self._row_order(name, x)
        if name == "token_embd.weight" and self._rows is not None:
            x = x[:self._rows]
        if conv.norm_shift and old.endswith("norm.weight"):
            # the converter adds in float16 / float32 as stored, other types first made float32
            x = (x if x.dtype in (torch.float16, torch.float32) else x.float()) + conv.norm_shift
        return x

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`~.base.Checkpoint.read_rows` of the checkpoint's own rows where each row of the view is one of
        them (a matrix as stored, its rows permuted per head or regrouped, the embedding cut): only those rows
        are read. A transposed matrix's row is a column of the file, and other tensors' rows change in other
        ways (a norm shifted, a bias permuted within its one row): there the whole tensor is read, as
        :meth:`read` does. Time O(r m), or O(P) for the others."""
        info = self.info(name)  # first: an unknown name raises naming the model (a bare KeyError did not)
        old, conv = self._names[name], self.conversion
        if len(info.shape) != 2 or old.endswith(conv.transposed) or (conv.norm_shift and old.endswith("norm.weight")):
            return super().read_rows(name, rows)
        order = self._row_order(name, torch.arange(self.source.info(old).shape[0]))  # the view's row i: order[i]
        return self.source.read_rows(old, order[:info.shape[0]][rows])

    def _row_order(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` (the checkpoint's tensor, or its row numbers) with its rows put in the converter's order: q/k
        rows permuted per head, Falcon's fused rows regrouped. Time O(P)."""
        if name.endswith(_permuted(self.conversion)):
            x = permute_rows(x, self._heads[0] if ".attn_q." in name else self._heads[1])
        if self.conversion.regroup_qkv and name.endswith(".attn_qkv.weight"):
            x = regroup_qkv(x, *self._heads)
        return x

    def prefetch(self, name: str) -> None:
        self.source.prefetch(self._names[name])

    def close(self) -> None:
        self.source.close()


def _permuted(conv: Conversion) -> tuple[str, ...]:
    """The GGUF name endings whose rows the converter permutes per head (a bias is a column of rows)."""
    weights = (".attn_q.weight", ".attn_k.weight") if conv.permute_qk else ()
    return weights + ((".attn_q.bias", ".attn_k.bias") if conv.permute_qk_bias else ())


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


def regroup_qkv(w: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Falcon's fused query/key/value rows as llama.cpp stores them: Hugging Face keeps ``kv_heads`` groups of
    (heads / kv_heads query heads, one key head, one value head); the converter puts all query heads first,
    then all key heads, then all value heads (``FalconModel.modify_tensors``). A weight whose rows do not split
    so is returned unchanged."""
    groups, n = kv_heads, w.shape[0]
    if heads <= 0 or groups <= 0 or heads % groups or n % (heads + 2 * groups):
        return w
    x = w.reshape(groups, heads // groups + 2, n // (heads + 2 * groups), *w.shape[1:])  # (g, q per g + 2, d, ...)
    q, k, v = x[:, :-2], x[:, -2], x[:, -1]
    return torch.cat([t.reshape(-1, *w.shape[1:]) for t in (q, k, v)])  # (heads d + 2 g d, ...)


def _blocks(ckpt: Checkpoint) -> int:
    """1 + the largest block index among the names, the block being the first number in a name as the converter
    takes it (``model.layers.3.`` and GPT-2's ``h.3.``); 0 when there is none."""
    firsts = (next((int(p) for p in n.split(".") if p.isdecimal()), -1) for n in ckpt.keys())
    return max(firsts, default=-1) + 1
