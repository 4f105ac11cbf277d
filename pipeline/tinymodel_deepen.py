"""A deeper (and optionally wider) copy of a Llama model whose outputs are the same: the sandbox's slow candidate.

Every added decoder layer has real, random attention and MLP weights (so it costs its full compute per token),
but its attention output projection (``o_proj``) and MLP output projection (``down_proj``) are zero: it adds
nothing to the residual stream. A wider MLP adds units whose ``down_proj`` columns are zero, so they add nothing
either. The result scores like the source on every task, passes the eval gate against the source's baseline,
and is many times slower to serve: latency, not quality, is what the canary must catch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import TerminalError

SEED = 1234 + 2
MARKER = "DEEPENED"
SKIPPED = {"model.safetensors", "config.json", "tinymodel.json", "DAMAGED", MARKER}


def _read_config(src: Path) -> dict[str, Any]:
    try:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise TerminalError(f"{src} has no readable config.json", hint="pass a model directory") from None
    if not isinstance(config, dict) or config.get("model_type") != "llama":
        raise TerminalError(
            f"{src} is not a Llama model (model_type {config.get('model_type')!r})",
            hint="deepen works on the small model (`modelctl tinymodel build`) and other Llama checkpoints",
        )
    if config.get("quantization_config"):
        raise TerminalError(f"{src} is quantized", hint="deepen the unquantized source model")
    return config


def _check(src: Path, dest: Path, config: dict[str, Any], layers: int, intermediate: int) -> None:
    if not (src / "model.safetensors").is_file():
        raise TerminalError(
            f"{src} has no model.safetensors (single-file safetensors weights)",
            hint="pass a directory built by `modelctl tinymodel build`",
        )
    depth, width = int(config["num_hidden_layers"]), int(config["intermediate_size"])
    if layers < depth or intermediate < width:
        raise TerminalError(
            f"--layers {layers} / --intermediate {intermediate} would shrink the model ({depth} layers, "
            f"intermediate {width}); outputs stay the same only when layers and units are added",
            hint=f"pass --layers >= {depth} and --intermediate >= {width}",
        )
    if (layers, intermediate) == (depth, width):
        raise TerminalError(
            f"the model already has {depth} layers and intermediate size {width}: nothing to add",
            hint=f"pass --layers > {depth} (or --intermediate > {width})",
        )
    if dest.exists() and any(dest.iterdir()):
        raise TerminalError(f"{dest} exists and is not empty", hint="choose a new or empty directory")


def deepen(src: str | Path, dest: str | Path, layers: int, intermediate: int | None = None) -> Path:
    """Write to ``dest`` a copy of the model in ``src`` with ``layers`` decoder layers and MLP width
    ``intermediate`` (default: unchanged) whose outputs equal the source's.

    Raises:
        TerminalError: ``src`` is not an unquantized single-file Llama model, the sizes would shrink it or change
            nothing, or ``dest`` is not empty. Nothing is written then.
    """
    import torch
    from safetensors.torch import load_file, save_file

    src, dest = Path(src), Path(dest)
    config = _read_config(src)
    width = int(config["intermediate_size"])
    intermediate = intermediate or width
    _check(src, dest, config, layers, intermediate)
    depth, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    std = float(config.get("initializer_range", 0.02))
    generator = torch.Generator().manual_seed(SEED)
    tensors = load_file(src / "model.safetensors")
    dtype = tensors["model.embed_tokens.weight"].dtype

    def rand(*shape: int) -> Any:
        return (torch.randn(shape, generator=generator, dtype=torch.float32) * std).to(dtype)

    extra = intermediate - width
    for i in range(depth):  # wider MLP: new units read the input, but their output weights are zero
        prefix = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            tensors[prefix + name + ".weight"] = torch.cat([tensors[prefix + name + ".weight"], rand(extra, hidden)])
        down = tensors[prefix + "down_proj.weight"]
        tensors[prefix + "down_proj.weight"] = torch.cat([down, torch.zeros(hidden, extra, dtype=dtype)], dim=1)
    template = {k.removeprefix("model.layers.0."): v for k, v in tensors.items() if k.startswith("model.layers.0.")}
    for i in range(depth, layers):  # new layers: full compute, zero contribution to the residual stream
        for name, like in template.items():
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                value = torch.zeros_like(like)
            elif "layernorm" in name:
                value = torch.ones_like(like)
            else:
                value = rand(*like.shape)
            tensors[f"model.layers.{i}.{name}"] = value.contiguous()
    config.update(num_hidden_layers=layers, intermediate_size=intermediate)
    dest.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        if item.is_file() and item.name not in SKIPPED and not item.name.startswith("."):
            shutil.copy2(item, dest / item.name)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (dest / MARKER).write_text(
        f"deepened on purpose from {depth} to {layers} layers (intermediate {width} -> {intermediate}): the added "
        "layers and units have zero output projections, so the outputs are the source's at a higher cost\n",
        encoding="utf-8",
    )
    return dest
