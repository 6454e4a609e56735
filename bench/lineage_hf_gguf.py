"""Hugging Face models and their GGUF conversions in one lineage: are the conversions placed under their source?

Needs llama.cpp's source tree (not a dependency): its ``convert_hf_to_gguf.py`` converts each model, and, for
the K-quants, its ``llama-quantize`` (build commands in bench/lineage_llamacpp.py). The llama-cpp-python sdist
holds both:

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llcpp && tar xzf /tmp/llcpp/*.tar.gz -C /tmp/llcpp
    python bench/lineage_hf_gguf.py --llamacpp /tmp/llcpp/llama_cpp_python-*/vendor/llama.cpp --work /tmp/hfgguf \\
        [--quantize .../build/bin/llama-quantize]

For each architecture (--archs; default all of MODELS: llama with grouped-query attention, whose query and
key rows the converter permutes, qwen2, gemma / gemma2 / gemma3 with their norms stored + 1, gemma3 with its
embedding cut to the tokenizer's size, phi3 with fused qkv / gate_up, stablelm, starcoder2, olmo, olmo2,
olmo3, gpt2 with transposed Conv1D weights, falcon with regrouped qkv rows), transformers writes a randomly
initialised base (its 1-D weights, norms and biases, drawn at random too, so that a shift of the norms shows)
and three fine-tunes of it (each 2-D weight moved by 0.1 %, 1 % and 5 % of its standard deviation), and a
fourth that moves only its 1-D weights (5 %: BitFit-like; equal to the base on the compared square matrices,
it must be no copy of it, and its conversions must be its copies, not the base's). Every
model is converted to F32 (checked tensor by tensor against modelatlas's GGUF-named view: the two must be
equal), F16 and Q8_0 by the converter, and to --types by llama-quantize from the F16 file. The vocabulary
step of the converter is skipped (the models have no tokenizer; it writes no weight; gemma3 gets a
tokenizer.json of 500 + 4 entries, below its 512 embedding rows, since its converter reads one to cut the
embedding). Printed: the forest recovered from the Hugging Face folders and all GGUF files together, and how
many conversions were placed as copies of their own source.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.export import to_text
from modelatlas.weights import open_checkpoint
from modelatlas.weights.gguf_names import gguf_view

STEPS = {"ft0": 0.001, "ft1": 0.01, "ft2": 0.05}
NORMS = {"ftn": 0.05}  # a fine-tune of the 1-D weights alone (norms, biases: BitFit), by 5 % of their spread
CONVERT = """import sys
sys.path[:0] = [{root!r} + "/gguf-py", {root!r}]
import convert_hf_to_gguf as c
get_model_class = c.get_model_class
def no_vocab(*args, **kwargs):
    cls = get_model_class(*args, **kwargs)
    cls.set_vocab = lambda self: None  # no tokenizer: the vocabulary writes no weight
    return cls
c.get_model_class = no_vocab
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
c.main()
"""
DIMS = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary
# short name -> (transformers model class, config class, config arguments besides DIMS / in place of them)
MODELS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(head_dim=64)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(head_dim=64)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(head_dim=64)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {}),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", {}),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", {}),
    "olmo": ("OlmoForCausalLM", "OlmoConfig", {}),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {}),
    "olmo3": ("Olmo3ForCausalLM", "Olmo3Config", {}),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=512, n_embd=256, n_layer=2, n_head=4,
                                                   n_positions=128, n_ctx=128)),  # the converter reads n_ctx
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(vocab_size=512, hidden_size=256, num_hidden_layers=2,
                                                         num_attention_heads=4, num_kv_heads=2,
                                                         new_decoder_architecture=True)),
}
OWN_DIMS = ("gpt2", "falcon")  # configs named in their own words


def make_models(folder: Path, arch: str) -> list[Path]:
    """A base and its fine-tunes (STEPS: 2-D weights moved; NORMS: 1-D weights moved) saved by transformers'
    save_pretrained under ``folder``/{arch}-*."""
    import transformers

    torch.manual_seed(0)
    model_cls, config_cls, extra = MODELS[arch]
    config = getattr(transformers, config_cls)(**({} if arch in OWN_DIMS else DIMS), **IDS, **extra)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape) * 0.1)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    out = []
    moved = {"base": (0.0, 2), **{n: (s, 2) for n, s in STEPS.items()}, **{n: (s, 1) for n, s in NORMS.items()}}
    for name, (step, ndim) in moved.items():
        gen = torch.Generator().manual_seed(len(out))
        with torch.no_grad():
            for k, p in model.state_dict().items():
                noise = torch.randn(p.shape, generator=gen) * base[k].std() * step if p.ndim == ndim else 0
                p.copy_(base[k] + noise)
        model.save_pretrained(folder / f"{arch}-{name}")
        if arch == "gemma3":
            tokens = {"model": {"vocab": {f"t{i}": i for i in range(500)}}, "added_tokens": [{}] * 4}
            (folder / f"{arch}-{name}" / "tokenizer.json").write_text(json.dumps(tokens))
        out.append(folder / f"{arch}-{name}")
    return out


def convert(script: Path, model: Path, quantize: str | None, types: list[str]) -> list[Path]:
    """The model's F32, F16 and Q8_0 GGUF files (the converter) and --types (llama-quantize of the F16)."""
    files = []
    for t in ("f32", "f16", "q8_0"):
        out = model.parent / f"{model.name}-{t}.gguf"
        subprocess.run([sys.executable, str(script), str(model), "--outtype", t, "--outfile", str(out)],
                       check=True, capture_output=True)
        files.append(out)
    for t in types if quantize else []:
        out = model.parent / f"{model.name}-{t.lower()}.gguf"
        subprocess.run([quantize, str(files[1]), str(out), t], check=True, capture_output=True)
        files.append(out)
    return files


def check_view(model: Path, f32: Path) -> int:
    """Tensors of the F32 conversion that equal modelatlas's GGUF-named view of the model (all must)."""
    with open_checkpoint(model) as hf, open_checkpoint(f32) as g:
        view = gguf_view(hf, g.architecture, *g.head_counts())
        assert view is not None and sorted(view.keys()) == sorted(g.keys()), f"{model}: names differ"
        same = sum(torch.equal(view.read(k).float(), g.read(k).float()) for k in g.keys())
        assert same == len(g.keys()), f"{model}: {len(g.keys()) - same} tensors differ from the converter's"
        return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llamacpp", type=Path, required=True, help="llama.cpp source folder")
    ap.add_argument("--quantize", help="llama-quantize binary (optional: K-quants)")
    ap.add_argument("--types", default="Q4_K_M,Q5_K_M,Q6_K,Q4_0")
    ap.add_argument("--work", type=Path, default=Path("/tmp/hfgguf"))
    ap.add_argument("--archs", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    script = args.work / "convert.py"
    script.write_text(CONVERT.format(root=str(args.llamacpp)))
    archs = args.archs.split(",")
    if set(archs) - set(MODELS):
        ap.error(f"--archs: unknown {', '.join(sorted(set(archs) - set(MODELS)))}; known: {', '.join(MODELS)}")
    for arch in archs:
        models = make_models(args.work, arch)
        files = {m: convert(script, m, args.quantize, args.types.split(",")) for m in models}
        same = sum(check_view(m, fs[0]) for m, fs in files.items())
        print(f"{arch}: {same} tensors of {len(models)} F32 conversions equal modelatlas's GGUF-named view")
        forest = recover_lineage(models + [f for fs in files.values() for f in fs], stage="specialize")
        print(to_text(forest))
        copies = forest.decisions.get("duplicates", {})
        right = sum(copies.get(f.stem) == m.name for m, fs in files.items() for f in fs)
        total = sum(len(fs) for fs in files.values())
        outside = forest.decisions.get("outside_layers", {})
        print(f"{arch}: {right} of {total} conversions placed as copies of their own source; "
              f"architecture groups: {forest.decisions['architectures']}; models equal to another on the "
              f"compared layers only: {json.dumps(outside)}\n")


if __name__ == "__main__":
    main()
