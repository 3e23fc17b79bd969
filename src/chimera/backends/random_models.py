"""Random-weight models for a real vLLM CPU server, built locally (nothing is downloaded).

Run under the vLLM venv's interpreter, so the saved config and tokenizer match the transformers vLLM loads them with:

    .venv-vllm/bin/python -m chimera.backends.random_models --out out/models

This module imports only the standard library, torch, transformers and tokenizers (what `.venv-vllm` has): it must
not import the rest of chimera. Each model is a `Qwen2Config` with random weights (seeded) and a byte-level BPE
tokenizer trained on the standard library's `.py` files, with ChatML specials and chat template. Output text is noise;
output lengths are exact with `max_tokens` + `ignore_eos`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

FORMAT = 1  # bump when the recipe changes: a model folder with another format is rebuilt


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int = 4096
    seed: int = 0
    serve_dtype: str = "bfloat16"  # the --dtype a server runs it in (weights are stored in bf16 either way)

    @property
    def heads(self) -> int:
        return max(1, self.hidden // 64)

    @property
    def kv_heads(self) -> int:
        return max(1, self.hidden // 128)


# Two models whose decode speeds differ by >= 2x at concurrency 1, 8 and 32 on one CPU core each (docs/real-engines.md).
# `tiny` is all per-step and per-token overhead (a smaller one is no faster). `wide` is compute: ~2 FLOPs per weight
# per token, so its speed at concurrency 32 falls only with more weights (h1024 x 10, 197 MB, gave 2.0x there);
# it is served in float32 (weights stored in bf16), ~1.5x slower than bf16 at concurrency 1-8 on this CPU.
RECIPES: dict[str, ModelRecipe] = {
    "tiny": ModelRecipe("tiny", hidden=128, layers=2, intermediate=256),
    "wide": ModelRecipe("wide", hidden=1280, layers=8, intermediate=2560, serve_dtype="float32"),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_files(limit_bytes: int = 8_000_000) -> list[Path]:
    """The standard library's top-level `.py` files in name order, up to `limit_bytes` (deterministic per Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for p in sorted(root.glob("*.py")):
        out.append(p)
        total += p.stat().st_size
        if total >= limit_bytes:
            break
    if not out:
        raise RuntimeError(f"no .py files under {root} to train the tokenizer on")
    return out


def build_tokenizer(vocab: int, out_dir: Path):
    """Train a byte-level BPE (GPT-2 style) on local text and save it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = corpus_files()
    tok.train([str(p) for p in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 32768
    fast.save_pretrained(out_dir)
    return fast, files


def build_model(recipe: ModelRecipe, out_dir: Path) -> dict:
    """Build one model folder (config, bf16 safetensors weights, tokenizer, generation config); returns its info."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    tok, files = build_tokenizer(recipe.vocab, out_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
        bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, use_sliding_window=False,
    )
    cfg.dtype = torch.bfloat16
    torch.manual_seed(recipe.seed)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=pad).save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    info = {
        "format": FORMAT, "recipe": asdict(recipe), "parameters": params,
        "heads": recipe.heads, "kv_heads": recipe.kv_heads, "vocab_size": len(tok),
        "tokenizer_corpus": {"files": len(files), "root": str(files[0].parent),
                             "python": sys.version.split()[0]},
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "bytes": sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file()),
        "build_s": round(time.perf_counter() - t0, 2),
        "weights_sha256": hashlib.sha256((out_dir / "model.safetensors").read_bytes()).hexdigest(),
    }
    (out_dir / "chimera-model.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def is_built(recipe: ModelRecipe, out_dir: Path) -> bool:
    try:
        info = json.loads((out_dir / "chimera-model.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("format") == FORMAT and info.get("recipe") == asdict(recipe) and (
        out_dir / "model.safetensors").is_file()


def build_all(out: Path, names: list[str] | None = None, force: bool = False) -> dict[str, dict]:
    """Build the named recipes (default: all) under `out/NAME`; an up-to-date folder is kept unless `force`."""
    res = {}
    for name in names or list(RECIPES):
        if name not in RECIPES:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(RECIPES)}")
        d = out / name
        if not force and is_built(RECIPES[name], d):
            res[name] = json.loads((d / "chimera-model.json").read_text()) | {"kept": True}
            continue
        res[name] = build_model(RECIPES[name], d)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chimera.backends.random_models", description=__doc__.split("\n\n")[0],
                                 epilog="Example: .venv-vllm/bin/python -m chimera.backends.random_models --out out/models")
    ap.add_argument("--out", type=Path, default=Path("out/models"), help="Folder for one sub-folder per model.")
    ap.add_argument("--models", default=",".join(RECIPES), help=f"Comma-separated recipes ({', '.join(RECIPES)}).")
    ap.add_argument("--force", action="store_true", help="Rebuild folders that are already up to date.")
    a = ap.parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    for name, info in build_all(a.out, [m.strip() for m in a.models.split(",") if m.strip()], a.force).items():
        r = info["recipe"]
        state = "up to date" if info.get("kept") else f"built in {info['build_s']:.1f} s"
        print(f"{a.out / name}: hidden {r['hidden']} x {r['layers']} layers, {info['parameters'] / 1e6:.1f}M params, "
              f"{info['bytes'] / 1e6:.1f} MB ({state})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
