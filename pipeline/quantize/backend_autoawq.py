"""AWQ GEMM with AutoAWQ (archived upstream, still asked for by users).

AutoAWQ quantizes on the CPU, but its own CPU inference needs intel-extension-for-pytorch built for the same
torch, which does not exist for torch 2.13. So its output is verified by reading the saved tensors: every packed
layer is dequantized with AutoAWQ's own unpacking (``dequantize_gemm``) into a plain Llama checkpoint that
transformers runs (:func:`dequantize_to_dense`), and that must still answer like the source model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import TerminalError
from pipeline.progress import Progress
from pipeline.quantize.recipe import Recipe


def check(recipe: Recipe) -> None:
    """Refuse recipes AutoAWQ cannot build, before anything is loaded.

    Raises:
        TerminalError: not AWQ, or symmetric (AutoAWQ's GEMM format always carries zero points).
    """
    if recipe.method != "awq":
        raise TerminalError("backend autoawq only does AWQ", hint="use --backend llmcompressor for gptq")
    if recipe.symmetric:
        raise TerminalError(
            "backend autoawq writes asymmetric weights (with zero points) only",
            hint="set quantization.symmetric: false, or use backend llmcompressor",
        )


def quantize(model_dir: Path, out: Path, recipe: Recipe, texts: list[str], progress: Progress | None) -> str:
    """Quantize with AutoAWQ into ``out``; returns the artifact format."""
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    check(recipe)
    if progress:
        progress("loading the model", 0.05)
    model = AutoAWQForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if progress:
        progress(f"AWQ (AutoAWQ GEMM) calibration on {len(texts)} samples", 0.2)
    model.quantize(
        tokenizer,
        quant_config={
            "zero_point": True,
            "q_group_size": recipe.group_size,
            "w_bit": recipe.bits,
            "version": "GEMM",
            # AutoAWQ never quantizes lm_head; other ignored layers are named here.
            "modules_to_not_convert": [name for name in recipe.ignore if name != "lm_head"] or None,
        },
        calib_data=texts,
        max_calib_samples=len(texts),
        max_calib_seq_len=recipe.calibration.max_seq_len,
    )
    if progress:
        progress("writing AWQ GEMM weights", 0.9)
    model.save_quantized(str(out))
    tokenizer.save_pretrained(out)
    return "awq-gemm"


def dequantize_to_dense(artifact_dir: Path, out: Path) -> Path:
    """Write a plain (dequantized) copy of an AWQ GEMM checkpoint that transformers loads on any device."""
    import json

    from awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import load_file, save_file

    config = json.loads((artifact_dir / "config.json").read_text())
    quant = config.pop("quantization_config")
    bits, group = int(quant["bits"]), int(quant["group_size"])
    dense: dict[str, Any] = {}
    for file in sorted(artifact_dir.glob("*.safetensors")):
        tensors = load_file(file)
        for name, tensor in tensors.items():
            if name.endswith(".qweight"):
                base = name.removesuffix(".qweight")
                weight = dequantize_gemm(tensor, tensors[f"{base}.qzeros"], tensors[f"{base}.scales"], bits, group)
                dense[f"{base}.weight"] = weight.T.contiguous().float()
            elif not name.endswith((".qzeros", ".scales")):
                dense[name] = tensor.float() if tensor.is_floating_point() else tensor
    out.mkdir(parents=True, exist_ok=True)
    for item in artifact_dir.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in ("config.json", "artifact.json"):
            shutil.copy2(item, out / item.name)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(dense, out / "model.safetensors", metadata={"format": "pt"})
    return out
