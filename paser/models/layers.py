"""Per-layer widths of Llama-family decoders, and the folder format of paser's pruned models.

Structured pruning leaves every decoder layer with its own number of query heads, key/value heads
and MLP channels. Hugging Face configs describe one width for all layers, so a pruned model is saved
as a normal config plus ``paser_pruned.json`` (the widths of each layer) and safetensors weights;
``load_pruned_folder`` builds the base architecture on the meta device, reshapes each layer to its
saved widths and assigns the weights, so nothing is pickled and nothing is allocated twice.

Supported: decoders whose layers have ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``
(Llama 2/3, SmolLM2, Mistral, Qwen2/Qwen3).

    python -c "from paser.models.load import load_model; m = load_model('runs/pruned'); print(m.model)"
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from paser.errors import ModelLoadError, UnsupportedModelError

PRUNED_MARKER = "paser_pruned.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerShape:
    """Widths of one decoder layer."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-family causal LM, checked to have the projections paser edits."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or len(layers) == 0:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Llama-family decoder: expected model.model.layers "
            "(Llama, SmolLM2, Mistral, Qwen2 style)"
        )
    needed = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    names = {n for n, _ in layers[0].named_modules()}
    missing = [n for n in needed if n not in names]
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__} layers lack {', '.join(missing)}; paser prunes decoders with "
            "q/k/v/o attention projections and a gated MLP (Llama, SmolLM2, Mistral, Qwen2 style)"
        )
    return layers


def head_dim(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def layer_shapes(model: nn.Module) -> list[LayerShape]:
    """Read each layer's widths from its weights (the config only knows the dense widths)."""
    hd = head_dim(model)
    return [
        LayerShape(
            num_heads=layer.self_attn.q_proj.out_features // hd,
            num_kv_heads=layer.self_attn.k_proj.out_features // hd,
            intermediate_size=layer.mlp.gate_proj.out_features,
        )
        for layer in decoder_layers(model)
    ]


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def set_attention_counts(attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
    """Keep the attention module's bookkeeping in step with its projections.

    transformers reads ``num_key_value_groups`` at run time to repeat key/value heads; older
    releases also kept ``num_heads`` and ``num_key_value_heads`` on the module.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} key/value heads evenly")
    attn.num_key_value_groups = num_heads // num_kv_heads
    for name, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding the given output rows / input columns of ``linear`` (bias follows rows)."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    out.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.detach()
        if rows is not None:
            bias = bias.index_select(0, rows.to(bias.device))
        out.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)
    return out


def _empty_linear(template: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=template.bias is not None,
                     device="meta", dtype=template.weight.dtype)


def reshape_layer(layer: nn.Module, shape: LayerShape, hd: int) -> None:
    """Replace a layer's projections with empty (meta) ones of the given widths, ready for weights."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden = attn.q_proj.in_features
    attn.q_proj = _empty_linear(attn.q_proj, hidden, shape.num_heads * hd)
    attn.k_proj = _empty_linear(attn.k_proj, hidden, shape.num_kv_heads * hd)
    attn.v_proj = _empty_linear(attn.v_proj, hidden, shape.num_kv_heads * hd)
    attn.o_proj = _empty_linear(attn.o_proj, shape.num_heads * hd, hidden)
    set_attention_counts(attn, shape.num_heads, shape.num_kv_heads)
    mlp.gate_proj = _empty_linear(mlp.gate_proj, hidden, shape.intermediate_size)
    mlp.up_proj = _empty_linear(mlp.up_proj, hidden, shape.intermediate_size)
    mlp.down_proj = _empty_linear(mlp.down_proj, shape.intermediate_size, hidden)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = shape.intermediate_size


def _untied_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once, under its first name (the input embedding
    comes before lm_head, and transformers ties lm_head to it on load)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.contiguous()
    return state


def save_pruned_folder(model: nn.Module, tokenizer, folder: str | Path, info: dict) -> Path:
    """Write a pruned model as config + per-layer widths + safetensors + tokenizer (no pickle)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    # head_dim must be explicit: the default hidden_size // num_attention_heads is wrong once
    # heads are removed.
    config.head_dim = head_dim(model)
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_file(_untied_state(model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    marker = {
        "format": "paser-pruned",
        "version": FORMAT_VERSION,
        "layers": [asdict(s) for s in layer_shapes(model)],
        **info,
    }
    (folder / PRUNED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return folder


def read_pruned_marker(folder: Path) -> dict:
    path = folder / PRUNED_MARKER
    try:
        marker = json.loads(path.read_text())
        shapes = [LayerShape(**layer) for layer in marker["layers"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(
            f"{path}: not a valid paser pruned-model description "
            f"(expected JSON with a 'layers' list of num_heads/num_kv_heads/intermediate_size): {err}"
        ) from None
    if marker.get("format") != "paser-pruned" or marker.get("version", 0) > FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: format {marker.get('format')!r} version {marker.get('version')!r} is not one "
            f"this paser reads (paser-pruned, version <= {FORMAT_VERSION})"
        )
    marker["layers"] = shapes
    return marker


def load_pruned_folder(folder: str | Path, dtype: torch.dtype | None = None):
    """Rebuild a model saved by ``save_pruned_folder`` exactly: same widths, same weights."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    shapes = read_pruned_marker(folder)["layers"]
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"{folder}: pruned-model folder has no {WEIGHTS_FILE}")
    config = AutoConfig.from_pretrained(folder)
    if len(shapes) != config.num_hidden_layers:
        raise ModelLoadError(
            f"{folder / PRUNED_MARKER}: describes {len(shapes)} layers but config.json has "
            f"{config.num_hidden_layers}"
        )
    # Parameters on meta, buffers (rotary frequencies) real: weights are assigned below.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    hd = head_dim(model)
    for layer, shape in zip(decoder_layers(model), shapes):
        reshape_layer(layer, shape, hd)
    state = load_file(str(weights))
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ModelLoadError(f"{weights}: unexpected tensors {result.unexpected_keys[:5]}")
    model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_empty:
        raise ModelLoadError(f"{weights}: missing tensors {still_empty[:5]}")
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return model
