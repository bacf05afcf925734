"""`paser prune`: block-wise structured pruning in the manner of LLM-Pruner.

In every layer of a chosen range, whole attention heads and MLP intermediate channels are removed:
- a head group is a query head (its q_proj rows and o_proj columns); under grouped-query attention
  the same number of query heads is removed from every key/value group, so each group keeps a
  whole number of query heads; with ``gqa="groups"`` whole key/value groups (k/v rows, their query
  heads, o_proj columns) go instead. With one query head per key/value head (MHA) a group is a
  query head together with its key and value head.
- an MLP channel is a row of gate_proj and up_proj and the matching column of down_proj.
Importance of a group: first-order Taylor |w * dL/dw| summed over the group's weights (gradients
from calibration text), squared L2 magnitude, or random. Ranking is local to each layer, as in
LLM-Pruner's block-wise mode, so every layer may end with its own widths.

    paser prune smollm2-135m-instruct --ratio 0.25 --out runs/smollm2-pruned-25
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from paser.config import config_with
from paser.data.pools import load_pool, read_text_samples
from paser.data.prompts import format_example
from paser.data.suite import suite_pool
from paser.models.config import Importance, PruneConfig
from paser.models.layers import (
    LayerShape,
    count_parameters,
    decoder_layers,
    head_dim,
    layer_shapes,
    save_pruned_folder,
    set_attention_counts,
    sliced_linear,
)
from paser.models.load import load_model
from paser.models.load import resolve_dtype as torch_dtype
from paser.progress import announce


def default_layer_range(num_layers: int) -> tuple[int, int]:
    """LLM-Pruner prunes layers 4..30 of LLaMA-7B's 32; keep the same proportions at any depth."""
    start = int(num_layers * 4 / 32 + 0.5)
    end = num_layers - int(num_layers * 2 / 32 + 0.5)
    return start, max(start, end)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass
class LayerPlan:
    """What to keep in one layer: indices of query heads, key/value heads and MLP channels."""

    heads: torch.Tensor
    kv_heads: torch.Tensor
    channels: torch.Tensor


@dataclass
class PruneResult:
    """Outcome of pruning: the edited model plus figures for the report."""

    model: nn.Module
    params_before: int
    params_after: int
    shapes_before: list[LayerShape]
    shapes_after: list[LayerShape]
    seconds: float
    config: PruneConfig
    out: Path | None = None
    extras: dict = field(default_factory=dict)

    @property
    def kept_fraction(self) -> float:
        return self.params_after / self.params_before


# ---------------------------------------------------------------- importance


def _element_scores(weight: nn.Parameter, importance: Importance, gen: torch.Generator) -> torch.Tensor:
    w = weight.detach().float()
    if importance == "taylor":
        grad = getattr(weight, "offloaded_grad", None)  # kept on the host (accumulate_gradients, offload)
        grad = weight.grad if grad is None else grad
        if grad is None:
            raise RuntimeError("Taylor importance needs gradients: run calibration first")
        return (w.to(grad.device) * grad.detach().float()).abs()
    if importance == "l2":
        return w.pow(2)
    return torch.rand(w.shape, generator=gen)


def group_scores(model: nn.Module, importance: Importance, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per layer: importance of each query head, each key/value head, each MLP channel.

    Scores are sums of element scores over a group's weights: ``head`` covers a query head's
    q_proj rows and o_proj columns, ``kv_head`` a key/value head's k_proj and v_proj rows,
    ``channel`` gate/up rows and the down_proj column.
    """
    gen = torch.Generator().manual_seed(seed)
    hd = head_dim(model)
    out = []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        q = _element_scores(attn.q_proj.weight, importance, gen).sum(1)  # [heads * hd]
        o = _element_scores(attn.o_proj.weight, importance, gen).sum(0)  # [heads * hd]
        k = _element_scores(attn.k_proj.weight, importance, gen).sum(1)  # [kv * hd]
        v = _element_scores(attn.v_proj.weight, importance, gen).sum(1)
        gate = _element_scores(mlp.gate_proj.weight, importance, gen).sum(1)  # [inter]
        up = _element_scores(mlp.up_proj.weight, importance, gen).sum(1)
        down = _element_scores(mlp.down_proj.weight, importance, gen).sum(0)
        out.append({
            "head": (q + o).view(-1, hd).sum(1),
            "kv_head": (k + v).view(-1, hd).sum(1),
            "channel": gate + up + down,
        })
    return out


def accumulate_gradients(model: nn.Module, batches: list[dict[str, torch.Tensor]], offload: bool = False) -> None:
    """Backpropagate the language-model loss of the calibration batches into the layer weights.

    With ``offload`` each weight's gradient leaves the device as soon as the backward pass has made
    it: it is added into an fp32 copy on the host (``param.offloaded_grad``) and freed, so the
    device holds the weights and the activations, not a second copy of the weights as gradients
    (a 7B in fp32: 27 GB instead of about 55). The sums are the same fp32 additions in the same
    order, so the importance scores are bitwise those of the gradients kept on the device."""
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
        if hasattr(p, "offloaded_grad"):
            del p.offloaded_grad
    hooks = []

    def to_host(p: torch.Tensor) -> None:
        grad = p.grad.detach().float().cpu()
        p.offloaded_grad = grad if getattr(p, "offloaded_grad", None) is None else p.offloaded_grad.add_(grad)
        p.grad = None

    for layer in decoder_layers(model):
        for p in layer.parameters():
            p.requires_grad_(True)
            if offload:
                hooks.append(p.register_post_accumulate_grad_hook(to_host))
    try:
        for batch in batches:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(**batch, labels=labels, use_cache=False).loss / len(batches)
            loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    for p in model.parameters():
        p.requires_grad_(False)


def calibration_batches(tokenizer, texts: list[str], max_tokens: int, batch_size: int = 4,
                        device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_tokens)
        batches.append({"input_ids": enc["input_ids"].to(device),
                        "attention_mask": enc["attention_mask"].to(device)})
    return batches


def calibration_texts(source: str | None, count: int, seed: int) -> list[str]:
    """Calibration samples as prompt+response text, from a file or paser's capability suite."""
    if source is None:
        return ["".join(format_example(r)) for r in suite_pool(n=count, seed=seed).records]
    path = Path(source)
    if path.suffix.lower() in (".txt", ".text", ".md"):
        texts = read_text_samples(path)
    else:
        texts = ["".join(format_example(r)) for r in load_pool(path).records]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=g).tolist()
    return [texts[i] for i in order[:count]]


# ---------------------------------------------------------------- plan and surgery


def _lowest(scores: torch.Tensor, n_remove: int) -> set[int]:
    if n_remove <= 0:
        return set()
    # stable: ties broken by index, so the plan is deterministic; one copy to the host, not one
    # device sync per element (an MLP of 11,008 channels on a GPU)
    values = scores.detach().float().cpu().tolist()
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    return set(order[:n_remove])


def plan_layer(shape: LayerShape, scores: dict[str, torch.Tensor], attn_ratio: float,
               mlp_ratio: float, gqa: str, round_to: int | None) -> LayerPlan:
    """Choose what one layer keeps, given its group scores and the ratios (0 keeps everything)."""
    n_heads, n_kv = shape.num_heads, shape.num_kv_heads
    per_group = n_heads // n_kv
    if attn_ratio > 0 and (per_group == 1 or gqa == "groups"):
        # Remove whole key/value groups: a group's score is its kv head plus its query heads.
        group = scores["kv_head"] + scores["head"].view(n_kv, per_group).sum(1)
        drop = _lowest(group, min(n_kv - 1, _round_half_up(n_kv * attn_ratio)))
        kv_keep = [g for g in range(n_kv) if g not in drop]
        heads = [g * per_group + j for g in kv_keep for j in range(per_group)]
    elif attn_ratio > 0:
        n_drop = min(per_group - 1, _round_half_up(per_group * attn_ratio))
        kv_keep, heads = list(range(n_kv)), []
        for g in range(n_kv):
            in_group = scores["head"][g * per_group:(g + 1) * per_group]
            drop = _lowest(in_group, n_drop)
            heads += [g * per_group + j for j in range(per_group) if j not in drop]
    else:
        kv_keep, heads = list(range(n_kv)), list(range(n_heads))

    inter = shape.intermediate_size
    keep_channels = inter
    if mlp_ratio > 0:
        keep_channels = inter - _round_half_up(inter * mlp_ratio)
        if round_to:
            keep_channels = _round_half_up(keep_channels / round_to) * round_to
        keep_channels = min(inter, max(round_to or 1, keep_channels, 1))
    drop = _lowest(scores["channel"], inter - keep_channels)
    channels = [c for c in range(inter) if c not in drop]
    as_index = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return LayerPlan(heads=as_index(heads), kv_heads=as_index(kv_keep), channels=as_index(channels))


def _head_rows(heads: torch.Tensor, hd: int) -> torch.Tensor:
    return (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)


def apply_plan(model: nn.Module, plans: list[LayerPlan | None]) -> nn.Module:
    """Physically remove the groups a plan does not keep (in place; returns the model)."""
    hd = head_dim(model)
    for layer, plan in zip(decoder_layers(model), plans):
        if plan is None:
            continue
        attn, mlp = layer.self_attn, layer.mlp
        q_rows, kv_rows = _head_rows(plan.heads, hd), _head_rows(plan.kv_heads, hd)
        attn.q_proj = sliced_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = sliced_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = sliced_linear(attn.v_proj, rows=kv_rows)
        attn.o_proj = sliced_linear(attn.o_proj, cols=q_rows)
        set_attention_counts(attn, len(plan.heads), len(plan.kv_heads))
        mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=plan.channels)
        mlp.up_proj = sliced_linear(mlp.up_proj, rows=plan.channels)
        mlp.down_proj = sliced_linear(mlp.down_proj, cols=plan.channels)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(plan.channels)
    return model


def prune_model(model: nn.Module, tokenizer, config: PruneConfig | None = None) -> PruneResult:
    """Prune a loaded model in place according to ``config``; returns figures and the model."""
    config = config or PruneConfig()
    start = time.perf_counter()
    shapes_before = layer_shapes(model)
    params_before = count_parameters(model)
    n_layers = len(shapes_before)
    attn_range = config.attn_layers or default_layer_range(n_layers)
    mlp_range = config.mlp_layers or default_layer_range(n_layers)
    for name, (lo, hi) in (("attn_layers", attn_range), ("mlp_layers", mlp_range)):
        if hi > n_layers:
            raise ValueError(f"{name} ({lo}, {hi}) goes past the model's {n_layers} layers")
    attn_ratio = config.ratio if config.attn_ratio is None else config.attn_ratio
    mlp_ratio = config.ratio if config.mlp_ratio is None else config.mlp_ratio

    if config.importance == "taylor":
        texts = calibration_texts(config.calibration, config.num_calibration, config.seed)
        device = next(model.parameters()).device
        announce(f"Taylor importance: gradients of {len(texts)} calibration samples on {device}")
        # on a GPU the gradients wait on the host: the device holds one copy of the weights, not two
        accumulate_gradients(model, calibration_batches(tokenizer, texts, config.calibration_max_tokens,
                                                        device=device), offload=device.type == "cuda")
    scores = group_scores(model, config.importance, seed=config.seed)
    for p in model.parameters():
        p.grad = None
        if hasattr(p, "offloaded_grad"):
            del p.offloaded_grad

    plans = []
    for i, (shape, layer_scores) in enumerate(zip(shapes_before, scores)):
        a = attn_ratio if attn_range[0] <= i < attn_range[1] else 0.0
        m = mlp_ratio if mlp_range[0] <= i < mlp_range[1] else 0.0
        plans.append(plan_layer(shape, layer_scores, a, m, config.gqa, config.round_to)
                     if (a > 0 or m > 0) else None)
    announce(f"removing {attn_ratio:.0%} of the attention heads and {mlp_ratio:.0%} of the MLP channels in layers "
             f"{attn_range[0]}-{attn_range[1] - 1} / {mlp_range[0]}-{mlp_range[1] - 1}")
    apply_plan(model, plans)
    model.eval()
    return PruneResult(
        model=model, params_before=params_before, params_after=count_parameters(model),
        shapes_before=shapes_before, shapes_after=layer_shapes(model),
        seconds=time.perf_counter() - start, config=config,
        extras={"attn_layers": list(attn_range), "mlp_layers": list(mlp_range)},
    )


def export_llm_pruner_pickle(model: nn.Module, tokenizer, path: str | Path) -> Path:
    """Write LLM-Pruner's checkpoint layout, ``torch.save({'model', 'tokenizer'})``, for tools that
    expect it. Loading it back needs unpickling, so paser's own folder is the safer format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "tokenizer": tokenizer}, path)
    return path


def prune(model: str = "smollm2-135m-instruct", out: str | Path = "runs/pruned",
          config: PruneConfig | None = None, *, export_pickle: str | Path | None = None,
          trust_pickle: bool = False, dtype: str | None = "float32", device: str | None = None,
          save_dtype: str | None = None, **overrides) -> PruneResult:
    """Load ``model``, prune it, save the result to ``out`` (and optionally an LLM-Pruner pickle).

    ``overrides`` are ``PruneConfig`` fields, e.g. ``prune("m", "out", ratio=0.2, importance="l2")``.
    Taylor importance runs in fp32 by default: bf16 gradients are too coarse to rank groups.
    ``device``: where the calibration passes and the pruning run (default CPU; ``cuda`` is much
    faster for Taylor importance on a large model; its gradients then wait on the host).
    ``save_dtype``: the dtype the pruned weights are saved in (default: as pruned), e.g. the
    bfloat16 that scoring will load on a GPU, at half the disk and host memory of fp32.
    """
    config = config_with(config or PruneConfig(), overrides)
    announce(f"loading {model}")
    loaded = load_model(model, dtype=dtype, trust_pickle=trust_pickle, device=device)
    result = prune_model(loaded.model, loaded.tokenizer, config)
    if save_dtype is not None:
        result.model.to(torch_dtype(save_dtype))
    info = {
        "base_model": loaded.reference,
        "pruning": {k: v for k, v in asdict(config).items()} | result.extras,
        "params_before": result.params_before,
        "params_after": result.params_after,
    }
    result.out = save_pruned_folder(result.model, loaded.tokenizer, out, info)
    if export_pickle:
        result.extras["pickle"] = str(export_llm_pruner_pickle(result.model, loaded.tokenizer, export_pickle))
    return result
