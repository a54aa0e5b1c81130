"""Train an ATP-LLaVA module (arXiv 2412.00447) for a Hugging Face LLaVA: ``vlm-tokenprune train atp``.

Training forward (:func:`soft_forward`, own hooks, not ``patch()``): the model runs on the whole
sequence (prompt + answer). A pre-hook on decoder layer K-1 builds the same scoring context as
inference (the prompt's visual and instruction tokens; the answer tokens are never queries) and
runs the module, whose head is the only part with gradients (the attention statistics are
computed without gradients). Every layer >= K then receives a 4-D float attention mask: the
causal + padding mask plus ``log M_j`` on the column of each visual key j, with
``M = sigmoid(margin)`` the paper's soft mask, so a token is down-weighted as a KEY for every
query, exactly as the hard mask (``log 0``/``log 1``) removes it at inference; ``hard=True``
applies that hard mask (the tests check it equals the pruned model's logits). Position ids are
unchanged (the kept tokens keep theirs). Needs ``attn_implementation`` eager or sdpa.

Objective (budget-constrained training): ``CE(answer tokens) + budget_weight * |mean_b(rho_b) - target|``
with ``rho_b = sum_j M_bj / N_b`` the soft kept fraction of row b, so the AVERAGE kept fraction is
driven to ``target`` while single rows may keep more or fewer tokens. The paper's extra
depth-weighted kept-token penalty only orders several modules; with one module it is omitted.
The LLM is frozen by default (``unfreeze_llm=True`` also trains the language model, saved with
``save_pretrained`` next to the weight file).

Command line (the shipped weights; CPU, one thread, a few minutes)::

    OMP_NUM_THREADS=1 vlm-tokenprune train atp --out vlm_tokenprune/assets/tiny_vlm/atp.safetensors

Data: the tiny VLM's synthetic training split (:func:`synthetic_batches`, a pure function of the
step and the seed, so a resumed run sees exactly the batches it would have seen). The Python
entry point :func:`train_atp` takes any model and any batch source (a function of the step or an
iterable of dicts with ``input_ids``, ``attention_mask``, ``pixel_values``, ``labels``; labels are
-100 except on the answer tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from ..compat import attn_implementation
from ..errors import InputError
from ..learned.artifact import save_weights
from ..learned.atp import KIND, ATPModule, ATPOutput, atp_from_context
from ..scoring import ScoringContext
from ..selection import right_packed
from .common import load_checkpoint, progress, rng_state, save_checkpoint, seed_everything, set_rng_state


@dataclass
class ATPTrainConfig:
    """Hyper-parameters of one training run (defaults: the shipped tiny-VLM weights)."""

    layer: int = 1  # the module drops tokens before this decoder layer (scores from layer - 1)
    target: float = 0.25  # average kept fraction of the visual tokens (the paper: 144 of 576)
    budget_weight: float = 2.0
    tau: float = 60.0  # sharp enough that the soft mask trains close to the hard one (30: leaks, 100: stalls)
    strides: tuple[int, ...] = (2, 3, 4, 6)
    head_hidden: int = 32
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    unfreeze_llm: bool = False
    llm_lr: float = 1e-5
    checkpoint_every: int = 50


# -- the training forward --------------------------------------------------------------------------


def scoring_context(layer: nn.Module, hidden: torch.Tensor, position_embeddings, layout, seq_valid: torch.Tensor,
                    prompt: torch.Tensor) -> ScoringContext:
    """The context inference builds at the scoring layer, for the prompt part (``prompt`` [B, L]) of ``hidden``."""
    B, L = seq_valid.shape
    ar = torch.arange(L, device=seq_valid.device).expand(B, L)
    is_vis = layout.is_visual & seq_valid
    vis_idx, vis_ok = right_packed(is_vis)
    text_idx, text_ok = right_packed(prompt & seq_valid & ~is_vis & (torch.cumsum(is_vis.long(), 1) > 0))
    g = lambda t: torch.gather(t, 1, vis_idx)  # noqa: E731
    return ScoringContext(
        layer=layer, hidden=hidden, position_embeddings=position_embeddings, seq_valid=seq_valid,
        last_idx=(seq_valid * ar).argmax(1), visual_idx=vis_idx, visual_ok=vis_ok, orig_pos=vis_idx,
        row=g(layout.row), col=g(layout.col), segment=g(layout.segment), is_newline=g(layout.is_newline),
        coords_known=layout.coords_known, keep=vis_ok.sum(1), text_idx=text_idx, text_ok=text_ok,
    )


def soft_forward(model: nn.Module, module: ATPModule, batch: dict, *, hard: bool = False) -> tuple[torch.Tensor, ATPOutput, ScoringContext]:
    """``(logits [B, L, V], module output, scoring context)`` of ``model`` on ``batch`` with the ATP mask
    acting in layers >= ``module.layer`` (soft, or ``hard``). The prompt is every real token before the
    first labelled one (``batch["labels"]``; without labels, the whole sequence)."""
    from ..adapters import resolve_adapter

    adapter = resolve_adapter(model)
    seams = adapter.seams(model)
    if adapter.scoring_reads_layer_mask:
        raise InputError("model", f"ATP training builds one causal 4-D mask for the layers after the module; "
                         f"{model.config.model_type!r} masks are per layer (sliding window of original positions, "
                         "image block) and are not rebuilt here; allowed: a model whose layers share one causal mask "
                         "(every supported family but gemma3)")
    impl = attn_implementation(model.config.text_config)
    if impl not in ("eager", "sdpa"):
        raise InputError("attn_implementation", f"ATP training needs 4-D float masks; allowed: eager, sdpa; got {impl!r}")
    ids = batch["input_ids"]
    B, L = ids.shape
    seq_valid = batch["attention_mask"].bool() if batch.get("attention_mask") is not None else torch.ones_like(ids, dtype=torch.bool)
    labels = batch.get("labels")
    ar = torch.arange(L, device=ids.device)
    if labels is not None:
        labelled = labels != -100
        first = torch.where(labelled.any(1), (labelled * 1).argmax(1), torch.full((B,), L, device=ids.device))
        prompt = ar[None, :] < first[:, None]
    else:
        prompt = torch.ones_like(seq_valid)
    layout = adapter.visual_layout(model, ids, batch)
    K = module.layer
    box: dict[str, Any] = {}

    def score_hook(mod, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        ctx = scoring_context(mod, hidden, kwargs.get("position_embeddings"), layout, seq_valid, prompt)
        box["ctx"], box["out"] = ctx, atp_from_context(module, ctx)
        return None

    def mask_hook(mod, args, kwargs):
        if "mask" not in box:
            ctx, out = box["ctx"], box["out"]
            dtype = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).dtype
            neg = torch.finfo(dtype).min
            if hard:
                col = torch.where(out.hard, 0.0, neg)
            else:
                col = F.logsigmoid(out.margin)
            bias = torch.zeros(B, L + 1, dtype=col.dtype, device=ids.device)
            bias = bias.scatter(1, ctx.visual_idx.masked_fill(~ctx.visual_ok, L), col)[:, :L]
            allowed = (ar[None, :] <= ar[:, None])[None] & seq_valid[:, None, :]  # [B, L, L] causal + padding
            base = torch.where(allowed, 0.0, neg).to(bias.dtype)
            box["mask"] = (base + bias[:, None, :]).clamp(min=neg)[:, None].to(dtype)  # [B, 1, L, L]
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = box["mask"]
        return args, kwargs

    layers = seams.decoder_layers
    hooks = [layers[K - 1].register_forward_pre_hook(score_hook, with_kwargs=True)]
    hooks += [layers[j].register_forward_pre_hook(mask_hook, with_kwargs=True) for j in range(K, len(layers))]
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, box["out"], box["ctx"]


def atp_loss(logits: torch.Tensor, labels: torch.Tensor, out: ATPOutput, ok: torch.Tensor, target: float,
             budget_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``CE + budget_weight * |mean_b rho_b - target|`` (see the module docstring) and its parts."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    rho = out.soft.sum(1) / ok.sum(1).clamp(min=1)
    budget = (rho.mean() - target).abs()
    kept = (out.hard.sum(1).float() / ok.sum(1).clamp(min=1)).mean()
    loss = ce + budget_weight * budget
    return loss, {"loss": float(loss.detach()), "ce": float(ce.detach()), "soft_kept": float(rho.detach().mean()),
                  "hard_kept": float(kept)}


# -- data: the tiny VLM's synthetic training split -------------------------------------------------
def synthetic_batches(processor, batch_size: int, seed: int = 0, split: str = "train",
                      image_size: int | None = None) -> Callable[[int], dict]:
    """``batch(step) -> dict``: ``batch_size`` examples of ``split`` (question types balanced), answer + ``</s>``
    appended and labelled, left padded; a pure function of ``(step, seed)`` (seed s starts at the split's
    example ``s * 10**7``)."""
    from ..eval.synthetic import QTYPES, SPLIT_SEED_BASE, make_example
    from ..eval.tiny_vlm import PROMPT

    tok = processor.tokenizer
    base = SPLIT_SEED_BASE[split] + seed * 10_000_000

    def batch(step: int) -> dict:
        exs = [make_example(base + step * batch_size + i, QTYPES[(step * batch_size + i) % len(QTYPES)], image_size)
               for i in range(batch_size)]
        texts = [PROMPT.format(question=e["question"]) + f" {e['answer']} {tok.eos_token}" for e in exs]
        tok.padding_side = "left"
        enc = processor(images=[e["image"] for e in exs], text=texts, return_tensors="pt", padding=True)
        labels = torch.full_like(enc["input_ids"], -100)
        for b, e in enumerate(exs):
            n = len(tok(f"{e['answer']} {tok.eos_token}", add_special_tokens=False)["input_ids"])
            labels[b, -n:] = enc["input_ids"][b, -n:]
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "pixel_values": enc["pixel_values"], "labels": labels}

    return batch


# -- the loop --------------------------------------------------------------------------------------
def train_atp(model: nn.Module, batches: "Callable[[int], dict] | Iterable[dict]", cfg: ATPTrainConfig, out: str, *,
              checkpoint: str | None = None, resume: bool = False, show_progress: bool = True) -> tuple[ATPModule, list[dict]]:
    """Train one ATP module on ``model`` (frozen unless ``cfg.unfreeze_llm``) and write it to ``out``
    (:func:`~vlm_tokenprune.learned.artifact.save_weights`, kind ``"atp"``). Returns the module and the
    per-step history. ``checkpoint``: a file written every ``cfg.checkpoint_every`` steps;
    ``resume=True`` continues from it (same config), bit-for-bit what an uninterrupted run gives."""
    from ..adapters import resolve_adapter

    seams = resolve_adapter(model).seams(model)
    impl = attn_implementation(model.config.text_config)
    if impl not in ("eager", "sdpa"):
        raise InputError("attn_implementation", f"ATP training needs 4-D float masks; allowed: eager, sdpa; got {impl!r}")
    if not 1 <= cfg.layer < seams.num_layers:
        raise InputError("layer", f"{cfg.layer} is outside this model; allowed: 1..{seams.num_layers - 1}")
    if not 0 < cfg.target <= 1:
        raise InputError("target", f"must be in (0, 1], got {cfg.target}")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.head_hidden < 1 or cfg.tau <= 0:
        raise InputError("steps", f"steps, batch_size, head_hidden must be >= 1 and tau > 0; got {cfg.steps}, "
                                  f"{cfg.batch_size}, {cfg.head_hidden}, {cfg.tau}")
    if any(int(s) < 2 for s in cfg.strides):
        raise InputError("strides", f"SAP grid strides must be integers >= 2 (none: no spatial score), got {list(cfg.strides)}")
    seed_everything(cfg.seed)
    D = model.config.text_config.hidden_size
    module = ATPModule(D, cfg.head_hidden, cfg.tau, tuple(cfg.strides), cfg.layer)
    param = next(model.parameters())
    module = module.to(param.device)
    model.requires_grad_(False)
    groups = [{"params": list(module.parameters()), "lr": cfg.lr}]
    lm = seams.language_model
    if cfg.unfreeze_llm:
        lm.requires_grad_(True)
        groups.append({"params": [p for p in lm.parameters()], "lr": cfg.llm_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    start, history = 0, []
    state = load_checkpoint(checkpoint) if (checkpoint and resume) else None
    if state is not None:
        if state["config"] != _cfg_dict(cfg):
            raise InputError("resume", f"{checkpoint!r} was written with another configuration: {state['config']}")
        module.load_state_dict(state["module"])
        if cfg.unfreeze_llm:
            lm.load_state_dict(state["llm"])
        opt.load_state_dict(state["optim"])
        set_rng_state(state["rng"])
        start, history = state["step"], state["history"]
    source = batches if callable(batches) else _skip(iter(batches), start)
    module.train()
    for step in progress(range(start, cfg.steps), total=cfg.steps, initial=start, desc="train atp", enabled=show_progress):
        batch = source(step) if callable(source) else next(source)
        batch = {k: (v.to(param.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        logits, outp, ctx = soft_forward(model, module, batch)
        loss, parts = atp_loss(logits, batch["labels"], outp, ctx.visual_ok, cfg.target, cfg.budget_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"step": step + 1, **parts})
        if checkpoint and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(checkpoint, {
                "step": step + 1, "module": module.state_dict(), "optim": opt.state_dict(), "rng": rng_state(),
                "history": history, "config": _cfg_dict(cfg), "llm": lm.state_dict() if cfg.unfreeze_llm else None,
            })
    module.eval()
    model.requires_grad_(False)
    hp = {**module.hparams(), "target": cfg.target, "budget_weight": cfg.budget_weight, "steps": cfg.steps,
          "seed": cfg.seed, "lr": cfg.lr, "batch_size": cfg.batch_size, "unfreeze_llm": cfg.unfreeze_llm}
    save_weights(out, KIND, module.state_dict(), hp, model)
    if cfg.unfreeze_llm:
        model.save_pretrained(os.path.splitext(out)[0] + ".llm")
    return module, history


def _cfg_dict(cfg: ATPTrainConfig) -> dict:
    d = asdict(cfg)
    d["strides"] = list(d["strides"])
    d.pop("checkpoint_every")
    return d


def _skip(it, n: int):
    for _ in range(n):
        next(it)
    return it


@torch.no_grad()
def evaluate_kept(model: nn.Module, module: ATPModule, batches: Callable[[int], dict], n_batches: int,
                  offset: int = 0) -> dict[str, float]:
    """Mean soft / hard kept fraction and the hard-mask CE on ``n_batches`` held-out batches."""
    rows = []
    for i in range(n_batches):
        batch = batches(offset + i)
        logits, outp, ctx = soft_forward(model, module, batch, hard=True)
        _, parts = atp_loss(logits, batch["labels"], outp, ctx.visual_ok, 0.0, 0.0)
        rows.append(parts)
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("ce", "soft_kept", "hard_kept")}


# -- command line ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlm-tokenprune train atp", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="weight file to write (.safetensors)")
    p.add_argument("--model", default=None, help="a LLaVA directory with its processor (default: the shipped tiny VLM)")
    d = ATPTrainConfig()
    p.add_argument("--layer", type=int, default=d.layer)
    p.add_argument("--target", type=float, default=d.target, help="average kept fraction of the visual tokens")
    p.add_argument("--budget-weight", type=float, default=d.budget_weight)
    p.add_argument("--tau", type=float, default=d.tau)
    p.add_argument("--strides", default=",".join(map(str, d.strides)), help="SAP grid strides, comma separated")
    p.add_argument("--head-hidden", type=int, default=d.head_hidden)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--unfreeze-llm", action="store_true", help="also train the language model (saved next to --out)")
    p.add_argument("--llm-lr", type=float, default=d.llm_lr)
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUT.ckpt, removed when the run completes)")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep the checkpoint after a completed run")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        strides = tuple(int(s) for s in a.strides.split(",") if s.strip())
    except ValueError:
        p.error(f"--strides: expected integers joined by commas, got {a.strides!r}")
    if any(s < 2 for s in strides):
        p.error(f"--strides: each stride must be >= 2, got {a.strides!r}")
    torch.set_num_threads(1)
    from ..eval.tiny_vlm import load_tiny_vlm

    model, processor = load_tiny_vlm(attn_implementation="sdpa", path=a.model)
    cfg = ATPTrainConfig(layer=a.layer, target=a.target, budget_weight=a.budget_weight, tau=a.tau, strides=strides,
                         head_hidden=a.head_hidden, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                         unfreeze_llm=a.unfreeze_llm, llm_lr=a.llm_lr, checkpoint_every=a.checkpoint_every)
    batches = synthetic_batches(processor, a.batch_size, a.seed)
    ckpt = a.checkpoint or a.out + ".ckpt"
    try:
        module, history = train_atp(model, batches, cfg, a.out, checkpoint=ckpt, resume=a.resume,
                                    show_progress=not a.no_progress)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not a.keep_checkpoint and os.path.isfile(ckpt):  # nothing left to resume: keep package folders clean
        os.remove(ckpt)
    val = evaluate_kept(model, module, synthetic_batches(processor, a.batch_size, a.seed, split="val"), 4)
    last = history[-1] if history else {}
    print(json.dumps({"last_step": last, "held_out_hard_mask": val}))
    print(f"wrote {os.path.abspath(a.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
