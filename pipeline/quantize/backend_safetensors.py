"""Method ``none``: the unquantized artifact, the source's safetensors weights as they are or cast to a dtype.

No quantizer runs and no model is instantiated: the weights, config, generation config and tokenizer files are
copied (safetensors files rewritten only when a dtype is asked for). It exists for engines that cannot serve
4-bit weights (vLLM's CPU build without AVX-512), so that such an environment still promotes an artifact built,
hashed, published and preloaded by the same steps as a quantized one.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import TerminalError
from pipeline.progress import Progress
from pipeline.quantize.recipe import Recipe

FORMAT = "unquantized"
# What save_pretrained and a tokenizer write; anything else in the source (notes, markers, pickles) stays out.
COPIED = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def _config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise TerminalError(f"{model_dir} has no readable config.json", hint="point at a transformers model") from None
    if not isinstance(config, dict):
        raise TerminalError(f"{model_dir}/config.json is not a JSON object", hint="point at a transformers model")
    return config


def check(model_dir: Path) -> None:
    """Refuse a source that cannot become an unquantized artifact, before anything is written.

    Raises:
        TerminalError: no config.json, already quantized, or no safetensors weights.
    """
    config = _config(model_dir)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise TerminalError(
            f"{model_dir} is already quantized ({method}): method none copies weights as they are and would "
            "label quantized weights unquantized",
            hint="promote the unquantized source model, or use method awq/gptq",
        )
    if not list(model_dir.glob("*.safetensors")):
        raise TerminalError(
            f"{model_dir} has no safetensors weights: method none copies safetensors only",
            hint="convert the checkpoint to safetensors first",
        )


def _cast(src: Path, dest: Path, dtype: str) -> int:
    """Rewrite one safetensors file with every floating tensor cast to ``dtype``; returns its tensor bytes."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    with safe_open(str(src), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(dest), metadata=metadata)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write(model_dir: Path, out: Path, recipe: Recipe, progress: Progress | None) -> str:
    """Write the unquantized artifact of ``model_dir`` into ``out``; returns the artifact format.

    Raises:
        TerminalError: see :func:`check`.
    """
    check(model_dir)
    names = sorted(p.name for p in model_dir.iterdir() if p.is_file())
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in COPIED)]
    total = 0
    for number, name in enumerate(chosen, 1):
        if progress:
            progress(f"writing {name}", 0.1 + 0.8 * number / len(chosen))
        src, dest = model_dir / name, out / name
        if recipe.dtype and name.endswith(".safetensors"):
            total += _cast(src, dest, recipe.dtype)
        else:
            shutil.copyfile(src, dest)
    if recipe.dtype:
        config = _config(model_dir)
        config["dtype"] = recipe.dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = recipe.dtype
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        index = out / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text(encoding="utf-8"))
            data.setdefault("metadata", {})["total_size"] = total
            index.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return FORMAT
