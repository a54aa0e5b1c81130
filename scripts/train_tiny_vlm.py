"""Train the shipped tiny LLaVA (vlm_tokenprune/assets/tiny_vlm) from scratch on synthetic visual QA, on CPU.

    OMP_NUM_THREADS=1 python scripts/train_tiny_vlm.py            # full run (see --steps), ~50 min on 1 core
    OMP_NUM_THREADS=1 python scripts/train_tiny_vlm.py --steps 60 --eval-every 30 --out /tmp/tiny_vlm_smoke

Model: the real ``LlavaForConditionalGeneration`` (CLIP vision 4 x 128, patch 8 on 128 px -> 16 x 16 = 256
visual tokens; Llama 4 x 192, GQA 6/2 heads) from :func:`vlm_tokenprune.eval.tiny_vlm.tiny_vlm_config`.

What makes it learn within the hour (see /work/shared/tiny-vlm-notes.md and benchmarks/results/tiny_vlm_training.md):

* fixed 2-D sine-cosine initialisation of the vision patch position embeddings (scaled, trainable);
* an auxiliary per-patch loss on the projector outputs (the tokens the LM receives): every patch predicts its
  grid cell's colour-shape *pair* (binding done in the vision tower, so "is there a blue square ?" becomes a
  single-key lookup), colour, shape, digit, and the cell's row and column (explicit location in each token,
  so questions about "the top left" or answers "top left" are content matches, independent of RoPE offsets);
* packing up to ``--turns`` questions about the same image into one multi-turn sequence (the first turn is the
  exact evaluation prompt); questions in one pack never give each other's answers away;
* training-only "where is the <absent pair> ?" -> "none" questions: the same lookup as "where is ...", with a
  dense signal on whether the lookup found anything, which is what yes/no existence needs;
* raised glibc malloc trim / mmap thresholds (freed activations stay in the heap), one torch thread.

Loss: answer-token cross entropy (answer words + ``</s>``) + ``--aux-weight`` x auxiliary loss. Deterministic
(seeded; batch ``s`` uses training seeds ``s*B .. s*B+B-1``). Progress: teacher-forced exact match per question
type on a fixed validation set (equal to greedy-decoding exact match), every ``--eval-every`` steps. The best
checkpoint (highest minimum per-type validation accuracy) is saved in fp16 with ``save_pretrained``; at the end
it is reloaded with :func:`load_tiny_vlm` and scored on the test split with real greedy ``generate``.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def raise_malloc_thresholds() -> None:
    """Keep freed activation memory in the heap (glibc trimming/unmapping it made steps 2-8x slower)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    except OSError:
        pass


raise_malloc_thresholds()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from vlm_tokenprune.eval import synthetic as S  # noqa: E402
from vlm_tokenprune.eval import tiny_vlm as T  # noqa: E402

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
TYPE_WEIGHTS = {"color": 1.0, "location": 1.2, "exists": 1.5, "count": 0.8, "read": 0.6}
AUX_HEADS = {"combo": 20, "color": 7, "shape": 5, "digit": 11, "row": S.GRID, "col": S.GRID}


# ----------------------------------------------------------------------------------------------- model
def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid*grid, dim] fixed 2-D sine-cosine table (half the channels for rows, half for columns)."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        a = pos[:, None] * omega[None, :]
        parts += [torch.sin(a), torch.cos(a)]
    return torch.cat(parts, dim=1).float()


def build_model(seed: int, pos_scale: float):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T.tiny_vlm_config()
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    vt = model.model.vision_tower
    emb = (vt.vision_model if hasattr(vt, "vision_model") else vt).embeddings
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    with torch.no_grad():
        table = torch.zeros_like(emb.position_embedding.weight)
        table[1:] = pos_scale * sincos_2d(table.shape[1], grid)
        emb.position_embedding.weight.copy_(table)
    return model


class AuxHeads(nn.Module):
    """Linear per-patch classifiers on the projector outputs (training only, not shipped)."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in AUX_HEADS.items()})

    def forward(self, feats: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(F.cross_entropy(h(feats).flatten(0, 1), labels[k].flatten()) for k, h in self.heads.items()) / len(self.heads)


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, 256, D] projector outputs (= what LlavaModel.get_image_features computes with this config)."""
    vt = model.model.vision_tower(pixel_values)
    return model.model.multi_modal_projector(vt.last_hidden_state[:, 1:])


def lm_logits_at(model, ids: torch.Tensor, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits at flat positions ``pos`` ([N, 2] batch/seq indices) of right-padded sequences (causal, no mask)."""
    emb = model.model.get_input_embeddings()(ids)
    img = ids == T.IMAGE_TOKEN_ID
    emb = emb.masked_scatter(img[..., None].expand_as(emb), feats.reshape(-1, feats.shape[-1]).to(emb.dtype))
    hidden = model.model.language_model(inputs_embeds=emb).last_hidden_state
    return model.lm_head(hidden[pos[:, 0], pos[:, 1]])


# ------------------------------------------------------------------------------------------------ data
VOCAB = T.build_vocab()


def encode(text: str) -> list[int]:
    return [VOCAB[w] for w in text.replace("?", " ?").replace(":", " :").lower().split()]


PREFIX = [T.BOS_ID] + encode("USER:") + [T.IMAGE_TOKEN_ID] * T.GRID_TOKENS


def pixel_array(img) -> np.ndarray:
    return ((np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def patch_labels(scene: dict) -> dict[str, np.ndarray]:
    """Per-patch (16x16, row-major) labels: the label of the grid cell the patch lies in."""
    g = T.IMAGE_SIZE // T.PATCH
    per = g // S.GRID
    lab = S.scene_labels(scene)
    pr, pc = np.divmod(np.arange(g * g), g)
    cell = (pr // per) * S.GRID + (pc // per)
    out = {k: v[cell] for k, v in lab.items()}
    out["row"] = pr // per
    out["col"] = pc // per
    return out


def pack_questions(scene: dict, rng: np.random.Generator, turns: int, absent_location: float) -> list[tuple[str, str, str]]:
    types = list(TYPE_WEIGHTS)
    p = np.array([TYPE_WEIGHTS[t] for t in types])
    p = p / p.sum()
    out, keys, questions = [], set(), set()
    for _ in range(turns * 4):
        if len(out) == turns:
            break
        qt = types[int(rng.choice(len(types), p=p))]
        q, a, key = S.ask(scene, qt, rng, absent_location=(qt == "location" and rng.random() < absent_location))
        if q in questions or (key is not None and key in keys):
            continue
        questions.add(q)
        keys.add(key)
        out.append((q, a, qt))
    return out


def train_batch(step: int, batch: int, turns: int, absent_location: float):
    seqs, tgts, pix = [], [], []
    labels: dict[str, list] = {k: [] for k in AUX_HEADS}
    for i in range(batch):
        seed = step * batch + i
        scene = S.make_scene(seed)
        rng = np.random.default_rng([seed, 3])
        pix.append(pixel_array(S.render(scene)))
        for k, v in patch_labels(scene).items():
            labels[k].append(v)
        ids, tgt = list(PREFIX), []
        for t, (q, a, _qt) in enumerate(pack_questions(scene, rng, turns, absent_location)):
            ids += (encode("USER:") if t else []) + encode(q) + encode("ASSISTANT:")
            ans = encode(a) + [T.EOS_ID]
            tgt += [(len(ids) - 1 + j, w) for j, w in enumerate(ans)]
            ids += ans
        seqs.append(ids)
        tgts.append(tgt)
    return collate(seqs, tgts, pix, labels)


def collate(seqs, tgts, pix, labels=None):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), T.PAD_ID, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
    pos = torch.tensor([(b, p) for b, t in enumerate(tgts) for p, _ in t], dtype=torch.long)
    y = torch.tensor([w for t in tgts for _, w in t], dtype=torch.long)
    out = {"ids": ids, "pos": pos, "y": y, "pixel_values": torch.from_numpy(np.stack(pix))}
    if labels is not None:
        out["labels"] = {k: torch.from_numpy(np.stack(v)) for k, v in labels.items()}
    return out


def single_turn(examples: list[dict]):
    """Teacher-forced evaluation batch in the exact inference format (one question per sequence)."""
    seqs, tgts, pix = [], [], []
    for e in examples:
        ids = list(PREFIX) + encode(e["question"]) + encode("ASSISTANT:")
        ans = encode(e["answer"]) + [T.EOS_ID]
        tgts.append([(len(ids) - 1 + j, w) for j, w in enumerate(ans)])
        seqs.append(ids + ans)
        pix.append(pixel_array(e["image"]))
    return collate(seqs, tgts, pix)


@torch.no_grad()
def teacher_forced_accuracy(model, batches) -> dict[str, float]:
    """Exact match of every answer token + </s> under teacher forcing (== greedy exact match)."""
    model.eval()
    hits: dict[str, list[int]] = {}
    for qtypes, b in batches:
        feats = image_features(model, b["pixel_values"])
        pred = lm_logits_at(model, b["ids"], feats, b["pos"]).argmax(-1) == b["y"]
        k = 0
        for r, qt in enumerate(qtypes):
            n = int((b["pos"][:, 0] == r).sum())
            hits.setdefault(qt, []).append(int(pred[k : k + n].all()))
            k += n
    model.train()
    return {qt: sum(v) / len(v) for qt, v in sorted(hits.items())}


# ------------------------------------------------------------------------------------------------ main
def save(model, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(torch.float16)
    half.save_pretrained(out, safe_serialization=True)
    T.build_processor().save_pretrained(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2200)
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--turns", type=int, default=6, help="questions packed per image")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--absent-location", type=float, default=0.3, help="fraction of location questions about absent pairs")
    ap.add_argument("--pos-scale", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--out", default=str(T.ASSET_DIR))
    ap.add_argument("--log", default=str(ROOT / "benchmarks" / "results" / "tiny_vlm_training.md"))
    ap.add_argument("--state", default="/tmp/tiny_vlm_train_state.pt", help="resumable training state")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--time-limit", type=float, default=0.0, help="stop (and keep the best checkpoint) after this many minutes")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    model = build_model(args.seed, args.pos_scale)
    aux = AuxHeads(model.config.text_config.hidden_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model params {n_params / 1e6:.2f} M, visual tokens {T.GRID_TOKENS}", flush=True)
    params = list(model.parameters()) + list(aux.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    val = S.make_split("val", args.val)
    val_batches = [([e["qtype"] for e in val[i : i + 25]], single_turn(val[i : i + 25])) for i in range(0, len(val), 25)]

    # the fast feature path must equal the model's own get_image_features
    with torch.no_grad():
        pv = val_batches[0][1]["pixel_values"][:2]
        ref = model.model.get_image_features(pixel_values=pv).pooler_output
        ref = torch.stack(list(ref)) if isinstance(ref, (list, tuple)) else ref
        assert torch.allclose(ref, image_features(model, pv), atol=1e-5), "feature path mismatch"

    start, best, curve = 0, (-1.0, -1.0), []
    if args.resume and os.path.exists(args.state):
        st = torch.load(args.state, weights_only=False)
        model.load_state_dict(st["model"]); aux.load_state_dict(st["aux"]); opt.load_state_dict(st["opt"])
        start, best, curve = st["step"], tuple(st["best"]), st["curve"]
        print(f"resumed at step {start}", flush=True)

    model.train()
    t0 = time.time()
    run_loss = run_aux = 0.0
    for step in range(start, args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        b = train_batch(step, args.batch, args.turns, args.absent_location)
        feats = image_features(model, b["pixel_values"])
        logits = lm_logits_at(model, b["ids"], feats, b["pos"])
        loss_ans = F.cross_entropy(logits, b["y"])
        loss_aux = aux(feats, b["labels"])
        loss = loss_ans + args.aux_weight * loss_aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run_loss += loss_ans.item(); run_aux += loss_aux.item()
        done = step + 1
        if done % 25 == 0:
            el = time.time() - t0
            print(f"step {done} ans {run_loss / 25:.4f} aux {run_aux / 25:.4f} lr {lr_at(step):.2e} "
                  f"{el / (done - start):.2f}s/step elapsed {el / 60:.1f} min", flush=True)
            run_loss = run_aux = 0.0
        over = args.time_limit and (time.time() - t0) / 60 > args.time_limit
        if done % args.eval_every == 0 or done == args.steps or over:
            acc = teacher_forced_accuracy(model, val_batches)
            score = (min(acc.values()), sum(acc.values()) / len(acc))
            curve.append({"step": done, "minutes": round((time.time() - t0) / 60, 1), **acc})
            tag = ""
            if score > best:
                best = score
                save(model, out)
                tag = "  [saved]"
            print(f"VAL step {done}: " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()) + tag, flush=True)
            torch.save({"model": model.state_dict(), "aux": aux.state_dict(), "opt": opt.state_dict(),
                        "step": done, "best": list(best), "curve": curve}, args.state)
            write_log(args, curve, n_params, None)
        if over:
            print(f"time limit reached at step {done}", flush=True)
            break
    wall = (time.time() - t0) / 60

    # final: reload the saved (fp16 on disk) checkpoint offline and score with real greedy generate
    m, proc = T.load_tiny_vlm(path=out)
    test = S.make_split("test", args.test)
    acc = T.evaluate(m, proc, test, batch_size=16)
    print("TEST (greedy generate, reloaded checkpoint): " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
    write_log(args, curve, n_params, {"test": acc, "wall_minutes": round(wall, 1)})


def write_log(args, curve, n_params, final) -> None:
    path = Path(args.log)
    path.parent.mkdir(parents=True, exist_ok=True)
    types = list(S.QTYPES)
    lines = [
        "# Tiny VLM training curve", "",
        "`scripts/train_tiny_vlm.py` (real `LlavaForConditionalGeneration`: CLIP-style tower 4x128, patch 8 on 128 px "
        f"-> {T.GRID_TOKENS} visual tokens; Llama 4x192, GQA 6/2; {n_params / 1e6:.2f} M parameters), CPU, one torch thread.", "",
        "Command: `OMP_NUM_THREADS=1 python scripts/train_tiny_vlm.py " + " ".join(_cli(args)) + "`", "",
        "Validation: teacher-forced exact match of all answer tokens + `</s>` (= greedy exact match), "
        f"{args.val} examples balanced over the question types, single-turn inference prompt.", "",
        "| step | minutes | " + " | ".join(types) + " |", "|" + "---|" * (len(types) + 2),
    ]
    for r in curve:
        lines.append(f"| {r['step']} | {r['minutes']} | " + " | ".join(f"{r.get(t, float('nan')):.3f}" for t in types) + " |")
    if final:
        acc = final["test"]
        lines += ["", f"Training wall time: {final['wall_minutes']} min.", "",
                  f"Test ({args.test} examples, checkpoint reloaded from fp16 safetensors, greedy `generate`, left padding):", "",
                  "| " + " | ".join(types + ["all"]) + " |", "|" + "---|" * (len(types) + 1),
                  "| " + " | ".join(f"{acc.get(t, float('nan')):.3f}" for t in types + ["all"]) + " |"]
    path.write_text("\n".join(lines) + "\n")


def _cli(args) -> list[str]:
    out = []
    for k in ("steps", "batch", "turns", "lr", "aux_weight", "absent_location", "seed"):
        out.append(f"--{k.replace('_', '-')} {getattr(args, k)}")
    return out


if __name__ == "__main__":
    main()
