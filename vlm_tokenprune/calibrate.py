"""Offline calibration for structural policies: ``calibrate(model, batches, what=...)``.

``what="heads"`` (YOPO, arXiv 2410.06169, "inactive visual head pruning"): per sample, layer
and head, ``ratio = sum of attention to visual keys / sum of attention to text keys`` over every
real query row of the prompt (post-softmax, RoPE, causal, padding masked; rebuilt from each
layer's own projections by ``attention.attention_rows``, so any attention backend works; on Gemma 3 each row
over the keys of the layer's own mask: its sliding window, the image block).
A policy then keeps a head when the majority of samples vote for it: ``ratio > threshold``,
or ``top_n`` (the n heads with the most votes per layer, ties by mean ratio); layers below
``keep_first`` (2) keep every head.

``what="layers"`` (EfficientVLA, arXiv 2506.10100, section "LLM layer pruning"): importance
``I(l) = 1 - mean_samples mean_positions cos(x_l, x_{l+1})`` with ``x_l`` the hidden states
entering decoder layer l and ``x_{l+1}`` leaving it (real tokens only); a policy skips the
least important layers (non-contiguous).

``what="sublayers"`` (FinerCut, arXiv 2405.18218): attention and MLP sublayers are separate
candidates; greedily, the one whose removal (with those already removed) changes the model's
next-token distributions least on the batches (Jensen-Shannon divergence to the unpruned model
at every real position) is removed next, up to ``count`` (default: half of all sublayers). The
artifact records the removal ``order`` and each step's divergence; a policy removes its first
``removed`` (``skip_sublayers:calibration=p.json,removed=4`` or the ``finercut`` preset). The
greedy loop lives in ``vlm_tokenprune.search.finercut``.

The artifact is a small JSON file carrying the text model's geometry and its hash; a policy
references it by path (``prune_heads:calibration=p.json,top_n=8``,
``efficientvla_layers:calibration=p.json``) and loading it on another model is an
``IncompatiblePolicyError`` naming the differing config field.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .adapters import resolve_adapter
from .attention import attention_rows
from .masking import allowed_of
from .errors import InputError, PolicyError, UnsupportedModelError
from .marking import is_patched
from .search.finercut import greedy_sublayers
from .structural.calibration import FORMAT, WHAT, config_hash, model_geometry, write_json

__all__ = ["calibrate"]

log = logging.getLogger(__name__)


def calibrate(model: nn.Module, batches: Iterable[Mapping[str, Any]], what: str = "heads", path: str | None = None,
              progress: bool = True, count: int | None = None) -> dict:
    """Run ``model`` (unpatched) on ``batches`` (dicts of model inputs) and record ``what``.

    Returns the artifact dict; writes it as JSON to ``path`` when given. Shapes:
    ``heads``: ``ratios`` [samples][layers][heads]; ``layers``: ``importance`` [layers] and
    ``per_sample`` [samples][layers]. One sample = one batch row with visual tokens (heads) / any row (layers).
    """
    from tqdm.auto import tqdm  # optional dependency, only for the progress bar

    if what not in WHAT:
        raise PolicyError("what", f"{what!r}; allowed: {', '.join(WHAT)}")
    if what == "sublayers":
        art = greedy_sublayers(model, list(batches), count=count, progress=progress)
        geo = model_geometry(model)
        art = {"format": FORMAT, "what": what, "config": geo, "config_hash": config_hash(geo), **art}
        if path is not None:
            write_json(path, art)
        return art
    if count is not None:
        raise PolicyError("count", f"only applies to what='sublayers', not {what!r}")
    adapter = resolve_adapter(model)
    adapter.check(model)
    seams = adapter.seams(model)
    if is_patched(seams.top):
        raise UnsupportedModelError("model", "is patched; calibrate the original model (unpatch first)")
    layers = seams.decoder_layers
    captured: dict = {}

    def pre(j, module, args, kwargs):
        captured[j] = [kwargs["hidden_states"] if not args else args[0], kwargs.get("position_embeddings"), None,
                       kwargs.get("attention_mask")]

    def post(j, module, args, kwargs, out):
        captured[j][2] = out[0] if isinstance(out, tuple) else out

    hooks = []
    per_sample: list = []
    try:
        for j, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(lambda m, a, k, j=j: pre(j, m, a, k), with_kwargs=True))
            if what == "layers":
                hooks.append(layer.register_forward_hook(lambda m, a, k, o, j=j: post(j, m, a, k, o), with_kwargs=True))
        for batch in tqdm(list(batches), desc=f"calibrate {what}", disable=not progress):
            batch = dict(batch)
            captured.clear()
            input_ids = batch["input_ids"]
            B, L = input_ids.shape
            valid = batch.get("attention_mask")
            valid = valid.bool() if valid is not None else torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
            with torch.no_grad():
                model(**batch, use_cache=False)
                if what == "layers":
                    rows = torch.zeros(B, len(layers))
                    for j in range(len(layers)):
                        x, _, y, _ = captured[j]
                        cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [B, L]
                        rows[:, j] = 1 - (cos * valid).sum(1) / valid.sum(1)
                    per_sample += rows.tolist()
                    continue
                is_vis = adapter.visual_layout(model, input_ids, batch).is_visual & valid
                text = valid & ~is_vis
                idx = torch.arange(L, device=input_ids.device).expand(B, L)
                ratios = []
                for j, layer in enumerate(layers):
                    hidden, pe, _, mask = captured[j]
                    # a family whose rows are not causal (Gemma 3: sliding window, image block): the layer's own mask rows
                    own = allowed_of(mask, B) if adapter.scoring_reads_layer_mask else None
                    probs = attention_rows(layer, hidden, pe, idx, idx, valid, valid, reduce="none",
                                           row_keys=None if own is None else own & valid[:, None, :])  # [B, H, L, L]
                    probs = probs * valid[:, None, :, None]
                    to_vis = (probs * is_vis[:, None, None, :]).sum((2, 3))
                    to_text = (probs * text[:, None, None, :]).sum((2, 3))
                    ratios.append(to_vis / to_text.clamp_min(1e-12))  # [B, H]
                r = torch.stack(ratios, 1)  # [B, layers, H]
                per_sample += [r[b].tolist() for b in range(B) if bool(is_vis[b].any())]
    finally:
        for h in hooks:
            h.remove()
    if not per_sample:
        raise InputError("batches", "gave no sample" + (" with visual tokens" if what == "heads" else ""))
    geo = model_geometry(model)
    art = {"format": FORMAT, "what": what, "config": geo, "config_hash": config_hash(geo), "samples": len(per_sample)}
    if what == "heads":
        art["ratios"] = per_sample
    else:
        art["per_sample"] = per_sample
        art["importance"] = torch.tensor(per_sample).mean(0).tolist()
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(art, f)
        log.info("calibration (%s, %d samples) written to %s", what, len(per_sample), path)
    return art
