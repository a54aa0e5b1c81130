"""Train CoViPAL's pruning module (arXiv 2508.17243), stage 1: attention-guided training.

The paper's stage 1 takes the attention that a deeper LLM layer ``l_g`` (the guidance layer) pays
to each visual token, accumulated over all heads, as the label the pruning module learns to
predict. The LVLM is frozen; only the module trains. Choices where the paper is silent
(also in README):

* queries: the last prompt token (``query="last"``: the position that emits the first answer
  token) or the mean over the instruction text tokens (``query="text"``); RoPE and the
  softmax over the whole causal row, exactly as the layer computes it (``attention.attention_rows``);
* target: that attention summed over heads, renormalised over the row's visual tokens
  (``a_k``); loss: ``KL(a || softmax_k(S))`` over the row's visual tokens (only the ranking
  matters for TopK, so the module regresses the distribution of the attention);
* guidance layer: ``max(1, round(num_layers / 4))`` unless given (the shipped tiny VLM: layer 1,
  where its answers read the image); AdamW, cosine learning rate, no dropout.

The paper's second stage is not implemented: we could not read its objective (see README).

Python: ``train(model, batches, out=..., config=CoViPALTrainConfig(...))`` on any supported HF
VLM and any iterable (or ``start_step -> iterator`` callable) of processor batches. Command line
(the shipped tiny VLM on its synthetic training split)::

    OMP_NUM_THREADS=1 vlm-tokenprune train covipal --out vlm_tokenprune/assets/tiny_vlm/covipal.safetensors
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import InputError, VTPError
from ..learned.artifact import save_weights
from ..learned.covipal import KIND, PPM, instruction_text, score_context
from .common import load_checkpoint, progress, rng_state, save_checkpoint, seed_everything, set_rng_state

QUERIES = ("last", "text")


@dataclass(frozen=True)
class CoViPALTrainConfig:
    """Stage-1 hyper-parameters (``guidance_layer=None``: ``max(1, round(num_layers / 4))``)."""

    steps: int = 800
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: int = 20
    hidden: int = 64
    layers: int = 1
    heads: int = 4
    guidance_layer: int | None = None
    query: str = "last"
    seed: int = 0
    checkpoint_every: int = 100

    def check(self, num_layers: int) -> None:
        """Raise an ``InputError`` naming the field before anything trains."""
        for name in ("steps", "hidden", "layers", "heads", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InputError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise InputError("hidden", f"must be a multiple of heads ({self.heads}), got {self.hidden}")
        if not self.lr > 0:
            raise InputError("lr", f"must be > 0, got {self.lr}")
        if self.query not in QUERIES:
            raise InputError("query", f"must be one of {', '.join(QUERIES)}, got {self.query!r}")
        g = self.guidance_layer
        if g is not None and not 0 <= g < num_layers:
            raise InputError("guidance_layer", f"{g} is not a decoder layer of this model; allowed: 0..{num_layers - 1}")


def default_guidance_layer(num_layers: int) -> int:
    return max(1, round(num_layers / 4))


class _Stop(Exception):
    """Raised in the guidance layer's pre-hook: nothing deeper needs to run."""


@torch.no_grad()
def guidance_targets(model: nn.Module, batch: Mapping[str, Any], layer: int, query: str = "last"):
    """Run the frozen VLM up to decoder layer ``layer``; return what stage 1 trains on.

    Returns ``(embeds [B, L, D], seq_valid [B, L], visual_idx [B, N], visual_ok [B, N], target [B, N])``:
    the language model's input (image features in their slots), the visual positions, and the
    guidance attention ``a`` (heads summed, renormalised over each row's visual tokens; a row
    without visual tokens is all zero).
    """
    from ..adapters import resolve_adapter
    from ..attention import attention_rows
    from ..masking import allowed_of

    adapter = resolve_adapter(model)
    adapter.check(model)
    seams = adapter.seams(model)
    if seams.language_model is None:
        raise InputError("model", f"{model.config.model_type!r}: no language-model input to train a pre_llm selector on")
    got: dict[str, Any] = {}

    def lm_hook(module, args, kwargs):
        got["embeds"] = kwargs["inputs_embeds"]

    def layer_hook(module, args, kwargs):
        got["hidden"] = kwargs["hidden_states"] if not args else args[0]
        got["pe"] = kwargs.get("position_embeddings")
        got["mask"] = kwargs.get("attention_mask")
        raise _Stop

    hooks = [seams.language_model.register_forward_pre_hook(lm_hook, with_kwargs=True),
             seams.decoder_layers[layer].register_forward_pre_hook(layer_hook, with_kwargs=True)]
    try:
        model(**batch, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    ids = batch["input_ids"]
    B, L = ids.shape
    mask = batch.get("attention_mask")
    seq_valid = mask.bool() if mask is not None else torch.ones(B, L, dtype=torch.bool, device=ids.device)
    image_id = getattr(model.config, "image_token_id", None)
    if image_id is None:
        image_id = model.config.image_token_index
    is_vis = (ids == image_id) & seq_valid
    counts = is_vis.sum(1)
    N = int(counts.max())
    vis_idx = torch.sort((~is_vis).to(torch.uint8), dim=1, stable=True).indices[:, :N]
    vis_ok = torch.arange(N, device=ids.device)[None] < counts[:, None]
    vis_idx = vis_idx.masked_fill(~vis_ok, 0)
    if query == "last":
        q_idx = (seq_valid * torch.arange(L, device=ids.device)).argmax(1, keepdim=True)
        q_ok = torch.ones_like(q_idx, dtype=torch.bool)
    else:
        q_idx, q_ok = instruction_text(seq_valid, vis_idx, vis_ok)
        if q_idx.shape[1] == 0:
            raise InputError("query", "'text' needs instruction tokens after the image; this batch has none")
    row_keys = None
    if adapter.scoring_reads_layer_mask:  # Gemma 3: each query row over its own keys (sliding window, image block)
        own = allowed_of(got["mask"], B)
        if own is not None:
            row_keys = torch.gather(own, 1, q_idx[:, :, None].expand(-1, -1, L)) & seq_valid[:, None, :]
    att = attention_rows(seams.decoder_layers[layer], got["hidden"], got["pe"], q_idx, vis_idx, vis_ok, seq_valid,
                         rope=True, softmax_over="row", reduce="mean", query_ok=q_ok, row_keys=row_keys)  # [B, N], fp32
    att = att * vis_ok
    target = att / att.sum(1, keepdim=True).clamp(min=1e-30)
    return got["embeds"], seq_valid, vis_idx, vis_ok, target


def kl_loss(scores: torch.Tensor, target: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Mean over rows with visual tokens of ``KL(target || softmax(scores))`` over the row's visual tokens."""
    logp = scores.float().masked_fill(~ok, float("-inf")).log_softmax(1)
    logp = torch.where(ok, logp, torch.zeros_like(logp))
    t = torch.where(ok, target, torch.zeros_like(target))
    kl = (t * (torch.log(t.clamp(min=1e-30)) - logp)).sum(1)
    rows = ok.any(1)
    return kl[rows].mean() if bool(rows.any()) else scores.sum() * 0.0


def topk_recall(scores: torch.Tensor, target: torch.Tensor, ok: torch.Tensor, keep: float) -> float:
    """Mean over rows of |top-k(scores) & top-k(target)| / k, k = max(1, floor(keep * n + 0.5))."""
    vals = []
    for b in range(scores.shape[0]):
        n = int(ok[b].sum())
        if n == 0:
            continue
        k = max(1, math.floor(keep * n + 0.5))
        s, t = scores[b, :n], target[b, :n]
        a = set(torch.topk(s, k).indices.tolist())
        c = set(torch.topk(t, k).indices.tolist())
        vals.append(len(a & c) / k)
    return sum(vals) / max(len(vals), 1)


def _lr(step: int, cfg: CoViPALTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _batches_from(batches: Iterable | Callable[[int], Iterable], start: int) -> Iterator:
    if callable(batches):
        return iter(batches(start))
    it = iter(batches)
    for _ in range(start):  # a plain iterable: skip what the checkpoint already consumed
        next(it)
    return it


def evaluate(model: nn.Module, ppm: PPM, batches: Sequence[Mapping[str, Any]], cfg: CoViPALTrainConfig,
             keep: float = 0.25) -> dict[str, float]:
    """Mean KL and top-``keep`` recall of the module against the guidance attention on ``batches``."""
    layer = cfg.guidance_layer if cfg.guidance_layer is not None else default_guidance_layer(_num_layers(model))
    kls, recs = [], []
    with torch.no_grad():
        for batch in batches:
            emb, valid, vidx, vok, target = guidance_targets(model, batch, layer, cfg.query)
            s = score_context(ppm, emb, valid, vidx, vok)
            kls.append(float(kl_loss(s, target, vok)))
            recs.append(topk_recall(s, target, vok, keep))
    return {"kl": sum(kls) / max(len(kls), 1), f"recall@{keep}": sum(recs) / max(len(recs), 1)}


def _num_layers(model: nn.Module) -> int:
    from ..adapters import resolve_adapter

    return resolve_adapter(model).seams(model).num_layers


def train(model: nn.Module, batches: Iterable | Callable[[int], Iterable], *, out: str,
          config: CoViPALTrainConfig = CoViPALTrainConfig(), checkpoint: str | None = None, resume: bool = False,
          progress_bar: bool = True, val_batches: Sequence[Mapping[str, Any]] | None = None,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Stage-1 training of a PPM for ``model`` (frozen); writes the weight file ``out`` (kind ``"covipal"``).

    ``batches``: model inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...), one per step;
    an iterable (skipped forward on resume) or a ``start_step -> iterable`` callable. ``checkpoint``:
    a file written every ``config.checkpoint_every`` steps and at the end; ``resume=True`` continues
    from it (same config required). Deterministic for a given seed and batch sequence.
    Returns ``{"out", "steps", "losses" (this run's), "val" (if val_batches)}``.
    """
    log = log or logging.getLogger(__name__).info
    num_layers = _num_layers(model)
    config.check(num_layers)
    layer = config.guidance_layer if config.guidance_layer is not None else default_guidance_layer(num_layers)
    cfg = dataclasses.replace(config, guidance_layer=layer)
    was_training = model.training
    model.eval()  # frozen: labels come from the model without dropout, under no_grad (its weights get no gradient)
    try:
        return _train(model, batches, out, cfg, layer, checkpoint, resume, progress_bar, val_batches, log)
    finally:
        model.train(was_training)


def _train(model, batches, out, cfg, layer, checkpoint, resume, progress_bar, val_batches, log) -> dict[str, Any]:
    D = model.get_input_embeddings().weight.shape[1]
    seed_everything(cfg.seed)
    ppm = PPM(D, cfg.hidden, cfg.layers, cfg.heads)
    dev = next(model.parameters()).device
    ppm.to(dev).train()
    opt = torch.optim.AdamW(ppm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if resume:
        if checkpoint is None:
            raise InputError("resume", "needs a checkpoint path")
        state = load_checkpoint(checkpoint)
        if state is not None:
            if state["config"] != dataclasses.asdict(cfg):
                diff = [k for k, v in dataclasses.asdict(cfg).items() if state["config"].get(k) != v]
                raise InputError("resume", f"checkpoint {checkpoint} was written with other settings ({', '.join(diff)})")
            ppm.load_state_dict(state["ppm"])
            opt.load_state_dict(state["opt"])
            set_rng_state(state["rng"])
            start = state["step"]
            log(f"resuming from {checkpoint} at step {start}")

    def save_ckpt(step: int) -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, {"step": step, "ppm": ppm.state_dict(), "opt": opt.state_dict(),
                                         "rng": rng_state(), "config": dataclasses.asdict(cfg)})

    losses: list[float] = []
    it = _batches_from(batches, start)
    bar = progress(range(start, cfg.steps), total=cfg.steps, initial=start, desc="covipal stage 1", enabled=progress_bar)
    for step in bar:
        batch = next(it)
        emb, valid, vidx, vok, target = guidance_targets(model, batch, layer, cfg.query)
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        loss = kl_loss(score_context(ppm, emb, valid, vidx, vok), target, vok)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress_bar and hasattr(bar, "set_postfix"):
            bar.set_postfix(kl=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_ckpt(step + 1)
    save_ckpt(cfg.steps)
    ppm.eval()
    result: dict[str, Any] = {"steps": cfg.steps, "losses": losses, "guidance_layer": layer}
    if val_batches:
        result["val"] = evaluate(model, ppm, val_batches, cfg)
    hparams = {**ppm.hparams, "guidance_layer": layer, "query": cfg.query, "steps": cfg.steps, "seed": cfg.seed,
               "lr": cfg.lr, "stage": 1}
    result["out"] = save_weights(out, KIND, ppm.state_dict(), hparams, model)
    return result


# -- command line: the shipped tiny VLM on its synthetic training split ------------------------------
def synthetic_batches(processor, batch_size: int, n_train: int, split: str = "train") -> Callable[[int], Iterator]:
    """``start_step -> iterator`` of processor batches: step s holds examples ``s*B .. s*B+B-1`` (mod ``n_train``)
    of the synthetic ``split`` (question types cycling), so a resumed run sees exactly the same data."""
    from ..eval.synthetic import QTYPES, make_example, split_seeds
    from ..eval.tiny_vlm import prompts

    seeds = split_seeds(split, n_train)

    def gen(start: int) -> Iterator:
        step = start
        while True:
            idx = [(step * batch_size + j) % n_train for j in range(batch_size)]
            ex = [make_example(seeds[i], QTYPES[i % len(QTYPES)]) for i in idx]
            yield dict(processor(images=[e["image"] for e in ex], text=prompts([e["question"] for e in ex]),
                                 return_tensors="pt", padding=True))
            step += 1

    return gen


def build_parser() -> argparse.ArgumentParser:
    d = CoViPALTrainConfig()
    p = argparse.ArgumentParser(prog="vlm-tokenprune train covipal",
                                description="Stage-1 (attention-guided) training of CoViPAL's pruning module "
                                            "(arXiv 2508.17243) on the tiny VLM's synthetic training split; LLM frozen.")
    p.add_argument("--model", default="tiny", help="'tiny' (the shipped tiny VLM) or a checkpoint folder in its format")
    p.add_argument("--out", default="covipal.safetensors", help="weight file to write (default ./covipal.safetensors)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUT + '.ckpt', removed once OUT is written)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint if there is one")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-train", type=int, default=20000, help="training examples cycled through (default 20000)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--guidance-layer", type=int, default=None, help="LLM layer whose attention is the label "
                   "(default max(1, round(num_layers / 4)): 1 on the tiny VLM)")
    p.add_argument("--query", default=d.query, choices=QUERIES,
                   help="whose attention: the last prompt token or the instruction text")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--val-n", type=int, default=160, help="validation-split examples for the final KL / recall (0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``vlm-tokenprune train covipal ...``; returns the exit status (2: bad option)."""
    p = build_parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        from ..eval.tiny_vlm import load_tiny_vlm

        if args.batch_size < 1 or args.n_train < 1 or args.val_n < 0:
            raise InputError("--batch-size/--n-train/--val-n", "must be >= 1 (--val-n >= 0)")
        torch.set_num_threads(args.threads)
        if args.model != "tiny" and not os.path.isdir(args.model):
            raise InputError("--model", f"{args.model!r} is neither 'tiny' nor a checkpoint folder")
        model, processor = load_tiny_vlm(path=None if args.model == "tiny" else args.model)
        cfg = CoViPALTrainConfig(steps=args.steps, lr=args.lr, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                 guidance_layer=args.guidance_layer, query=args.query, seed=args.seed,
                                 checkpoint_every=args.checkpoint_every)
        val = None
        if args.val_n:
            gen = synthetic_batches(processor, 16, args.val_n, split="val")(0)
            val = [next(gen) for _ in range(math.ceil(args.val_n / 16))]
        ckpt = args.checkpoint or args.out + ".ckpt"
        res = train(model, synthetic_batches(processor, args.batch_size, args.n_train), out=args.out, config=cfg,
                    checkpoint=ckpt, resume=args.resume, progress_bar=not args.no_progress, val_batches=val, log=print)
        if args.checkpoint is None and os.path.isfile(ckpt):  # done: the default checkpoint would only clutter OUT's folder
            os.remove(ckpt)
    except VTPError as e:
        print(f"vlm-tokenprune train covipal: error: {e}", file=sys.stderr)
        return 2
    tail = res["losses"][-50:]
    print(f"guidance layer {res['guidance_layer']}; training KL (mean of the last {len(tail)} steps): "
          f"{sum(tail) / max(len(tail), 1):.4f}")
    if "val" in res:
        print("validation: " + json.dumps({k: round(v, 4) for k, v in res["val"].items()}))
    print(f"wrote {os.path.abspath(res['out'])}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
