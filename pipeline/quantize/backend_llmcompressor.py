"""AWQ and GPTQ W4A16 with llmcompressor, written in the compressed-tensors format that vLLM loads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.progress import Progress
from pipeline.quantize.recipe import Recipe


@contextmanager
def _no_pinned_memory_without_accelerator() -> Iterator[None]:
    """Work around llmcompressor's AWQ calling ``pin_memory()`` on its activation cache.

    Pinning only speeds up host-to-device copies, and it raises "Cannot access accelerator device when none is
    available" on a CPU-only machine. So, only when no accelerator is present, pinning becomes a no-op for the
    duration of the call; with a GPU, llmcompressor runs untouched.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory

    def no_pin(self: Any, *args: Any, **kwargs: Any) -> None:
        return None

    IntermediatesCache.pin_memory = no_pin  # type: ignore[method-assign]
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


@contextmanager
def _quiet() -> Iterator[None]:
    """llmcompressor logs every layer (and a "no accelerator" warning per step) through loguru: keep it out of
    the pipeline's output while it runs; progress reaches the user through the progress callback instead."""
    from loguru import logger

    logger.disable("llmcompressor")
    try:
        yield
    finally:
        logger.enable("llmcompressor")


def _modifiers(recipe: Recipe) -> list[Any]:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    config_groups = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": recipe.bits,
                "type": "int",
                "symmetric": recipe.symmetric,
                "strategy": "group",
                "group_size": recipe.group_size,
            },
        }
    }
    ignore = list(recipe.ignore)
    if recipe.method == "gptq":
        return [GPTQModifier(config_groups=config_groups, ignore=ignore)]
    # AWQ in llmcompressor is a smoothing transform followed by a quantization modifier.
    return [AWQModifier(duo_scaling="both"), QuantizationModifier(config_groups=config_groups, ignore=ignore)]


def quantize(model_dir: Path, out: Path, recipe: Recipe, texts: list[str], progress: Progress | None) -> str:
    """Quantize the model in ``model_dir`` into ``out``; returns the artifact format."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress("loading the model", 0.05)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_len = recipe.calibration.max_seq_len

    def tokenize(row: dict[str, Any]) -> dict[str, Any]:
        return dict(tokenizer(row["text"], add_special_tokens=False, truncation=True, max_length=max_len))

    dataset = Dataset.from_dict({"text": texts}).map(tokenize, remove_columns=["text"])
    if progress:
        progress(f"{recipe.method.upper()} calibration on {len(texts)} samples", 0.2)
    with _no_pinned_memory_without_accelerator(), _quiet():
        oneshot(
            model=model,
            dataset=dataset,
            recipe=_modifiers(recipe),
            max_seq_length=max_len,
            num_calibration_samples=len(texts),
        )
    if progress:
        progress("writing compressed-tensors", 0.9)
    with _quiet():
        model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return "compressed-tensors"
