"""Quantized copies made by llama.cpp itself: are they found, and are quantized fine-tunes told apart?

Needs llama.cpp's `llama-quantize` (not a dependency; built from the llama-cpp-python sdist here, 2 cores):

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llcpp && tar xzf /tmp/llcpp/*.tar.gz -C /tmp/llcpp
    cd /tmp/llcpp/llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF \\
        && cmake --build build --target llama-quantize -j2
    python bench/lineage_llamacpp.py --quantize /tmp/llcpp/.../build/bin/llama-quantize --work /tmp/llamacpp

A tiny llama-architecture model (2 blocks, width 256, t(5)-distributed weights) is written as F32 GGUF, with
three fine-tunes of it (each 2-D weight moved by 0.1 %, 1 % and 5 % of its standard deviation). Each of the
four is quantized by llama-quantize to every --types. Printed: for each quantized file, the smallest share
of a layer's values that ``requantized_match`` finds consistent with each F32 model (1.0: it is that model
quantized; lineage needs >= 0.999 on every layer, >= 0.9999 for the K-quants, >= 0.998 for IQ4); then the forest recovered from all the files.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import subprocess
from pathlib import Path

import numpy as np

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.export import to_text
from modelatlas.weights import open_checkpoint

E, F, V, L, H = 256, 512, 512, 2, 4  # width, feed-forward, vocabulary, blocks, heads
STEPS = {"ft0": 0.001, "ft1": 0.01, "ft2": 0.05}


def make_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {"token_embd.weight": (V, E), "output_norm.weight": (E,), "output.weight": (V, E)}
    for i in range(L):
        for name, shape in (("attn_norm", (E,)), ("attn_q", (E, E)), ("attn_k", (E, E)), ("attn_v", (E, E)),
                            ("attn_output", (E, E)), ("ffn_norm", (E,)), ("ffn_gate", (F, E)), ("ffn_up", (F, E)),
                            ("ffn_down", (E, F))):
            shapes[f"blk.{i}.{name}.weight"] = shape
    return {k: np.ones(s, np.float32) if len(s) == 1 else (rng.standard_t(5, s) * 0.02).astype(np.float32)
            for k, s in shapes.items()}


def write_llama(path: Path, tensors: dict[str, np.ndarray], embed: int = E, blocks: int = L, ff: int = F,
                heads: int = H, vocab: int = V) -> None:
    """An F32 GGUF llama.cpp's quantizer accepts: the llama hyperparameters and a placeholder vocabulary
    (bench/lineage_quantized.py writes its zoos' models with it too)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(embed)
    w.add_block_count(blocks)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(embed // heads)
    w.add_vocab_size(vocab)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}".encode() for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)
    for k, x in tensors.items():
        w.add_tensor(k, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_models(work: Path, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    base = make_weights(rng)
    write_llama(work / "base.gguf", base)
    for name, step in STEPS.items():
        moved = {k: v + (step * v.std() * rng.standard_normal(v.shape)).astype(np.float32) if v.ndim == 2 else v
                 for k, v in base.items()}
        write_llama(work / f"{name}.gguf", moved)
    return [work / f"{n}.gguf" for n in ("base", *STEPS)]


def min_match(copy: Path, source: Path) -> float | None:
    """The smallest per-layer share over the copy's quantized layers (None: a type with no test here)."""
    with open_checkpoint(copy) as q, open_checkpoint(source) as s:
        shares = [q.requantized_match(t.name, s.read(t.name)) for t in q.tensors() if q.quantization(t.name)]
    return None if not shares or None in shares else min(shares)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantize", type=Path, required=True, help="llama.cpp's llama-quantize binary")
    ap.add_argument("--work", type=Path, required=True, help="new folder for the GGUF files")
    ap.add_argument("--types", default="Q8_0,Q5_1,Q4_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K,IQ4_NL,IQ4_XS")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.work.mkdir(parents=True)
    sources = make_models(args.work, args.seed)
    copies = []
    for src in sources:
        for kind in args.types.split(","):
            out = args.work / f"{src.stem}-{kind.lower()}.gguf"
            subprocess.run([str(args.quantize), str(src), str(out), kind], check=True, capture_output=True)
            copies.append(out)
    print("| quantized file | " + " | ".join(s.stem for s in sources) + " |")
    print("|---|" + "---|" * len(sources))
    for c in copies:
        cells = [min_match(c, s) for s in sources]
        print(f"| {c.stem} | " + " | ".join("-" if m is None else f"{m:.4f}" for m in cells) + " |")
    forest = recover_lineage(sources + copies, stage="specialize")
    print("\n" + to_text(forest))
    print("copies:", forest.decisions.get("precision_copies"))


if __name__ == "__main__":
    main()
