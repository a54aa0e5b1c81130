"""Model inputs from a search's own records (``search.records``): teacher-forced calibration batches and
greedy held-out accuracy, for any VLM whose processor takes ``processor(images=..., text=...)``.

Calibration target of a record: its ``answer``'s tokens (the tokenizer's, without special tokens, appended to
the prompt's); for a record without an answer, the UNPRUNED model's own greedy continuation of
``answer_tokens`` tokens (up to and including its end-of-sequence token), generated once before the search
and then teacher-forced for every candidate. The fitness is then EvoPress's (arXiv 2410.14649) KL to the
dense model on the dense model's own outputs.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import InputError
from .records import Record, normalise_answer


def _images(records: Sequence[Record]):
    from PIL import Image

    ims = [[Image.open(p).convert("RGB") for p in r.images] for r in records]
    return [i[0] for i in ims] if all(len(i) == 1 for i in ims) else ims


def prompt_inputs(model, processor, records: Sequence[Record], name: str = "calibration_data") -> dict:
    """Left-padded processor inputs of the records' prompts, on the model's device (floating tensors in its dtype)."""
    from ..eval.loading import to_device

    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    token = getattr(processor, "image_token", None)
    for r in records:  # where the prompt writes the processor's own placeholder, one per image (older processors do not check)
        if isinstance(token, str) and token and 0 < r.prompt.count(token) != len(r.images):
            raise InputError(f"{name}[lines {r.line}]", f"the prompt has {r.prompt.count(token)} image placeholder(s) "
                             f"{token!r} for {len(r.images)} image(s); one placeholder per image")
    try:
        inputs = processor(images=_images(records), text=[r.prompt for r in records], return_tensors="pt", padding=True)
    except (ValueError, TypeError) as e:
        lines = ", ".join(str(r.line) for r in records)
        raise InputError(f"{name}[lines {lines}]", f"the processor refused these records ({e}); the prompt must be the "
                         "full text the processor expects, with one image placeholder per image") from None
    return to_device(dict(inputs), model)


def _pad_id(processor, model) -> int:
    tok = getattr(processor, "tokenizer", processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = _eos_ids(model)[0] if _eos_ids(model) else 0
    return int(pad)


def _eos_ids(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@torch.no_grad()
def greedy_targets(model, processor, records: Sequence[Record], n_tokens: int, batch_size: int = 8,
                   name: str = "calibration_data") -> list[list[int]]:
    """The unpruned model's greedy continuation of each record's prompt: ``n_tokens`` new token ids, cut after the
    first end-of-sequence token. Call on an unpatched model."""
    eos, pad = set(_eos_ids(model)), _pad_id(processor, model)
    out: list[list[int]] = []
    for i in range(0, len(records), batch_size):
        inputs = prompt_inputs(model, processor, records[i : i + batch_size], name)
        gen = model.generate(**inputs, max_new_tokens=n_tokens, do_sample=False, pad_token_id=pad)
        for row in gen[:, inputs["input_ids"].shape[1]:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
    return out


def answer_ids(processor, text: str) -> list[int]:
    tok = getattr(processor, "tokenizer", processor)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def teacher_forced(inputs: dict, targets: Sequence[Sequence[int]], pad_id: int) -> tuple[dict, torch.Tensor]:
    """``inputs`` (left-padded prompts) with each row's target tokens appended, rows re-aligned on the right by
    more left padding; and the mask ``[B, K]`` over the last K positions of those that predict the targets."""
    ids = inputs["input_ids"]
    B, A = ids.shape[0], max(len(t) for t in targets)
    out = {}
    for k, v in inputs.items():
        if torch.is_tensor(v) and v.dim() == 2 and v.shape == ids.shape and not k.startswith("pixel"):
            fill = pad_id if k == "input_ids" else 0
            rows = []
            for b in range(B):
                a = len(targets[b])
                tail = (torch.tensor(targets[b], dtype=v.dtype) if k == "input_ids" else
                        torch.full((a,), 1 if k == "attention_mask" else 0, dtype=v.dtype))
                rows.append(torch.cat([torch.full((A - a,), fill, dtype=v.dtype, device=v.device), v[b],
                                       tail.to(v.device)]))
            out[k] = torch.stack(rows)
        else:
            out[k] = v
    K = A + 1
    mask = torch.zeros(B, K, dtype=torch.bool, device=ids.device)
    for b, t in enumerate(targets):
        mask[b, K - 1 - len(t) : K - 1] = True  # these positions predict the target's tokens
    return out, mask


def record_calibration_batches(model, processor, records: Sequence[Record], batch_size: int = 8, answer_tokens: int = 8,
                               name: str = "calibration_data"):
    """``(batches, masks, n_text, n_visual, targets)`` as ``data.calibration_batches`` (plus each record's target
    token ids): records with an ``answer`` are teacher-forced on it, the others on the unpruned model's greedy
    continuation (``greedy_targets``, computed once here)."""
    cfg = model.config
    image_id = getattr(cfg, "image_token_index", None) or getattr(cfg, "image_token_id", None)
    pad = _pad_id(processor, model)
    unanswered = [r for r in records if r.answer is None]
    greedy = dict(zip((r.line for r in unanswered), greedy_targets(model, processor, unanswered, answer_tokens,
                                                                    batch_size, name))) if unanswered else {}
    targets = [greedy[r.line] if r.answer is None else answer_ids(processor, r.answer) for r in records]
    for r, t in zip(records, targets):
        if not t:
            raise InputError(f"{name}[line {r.line}].answer", f"{r.answer!r} has no tokens for this tokenizer")
    batches, masks, texts, visuals = [], [], [], []
    for i in range(0, len(records), batch_size):
        inputs = prompt_inputs(model, processor, records[i : i + batch_size], name)
        for b in range(inputs["input_ids"].shape[0]):
            n_vis = int((inputs["input_ids"][b] == image_id).sum()) if image_id is not None else 0
            visuals.append(n_vis)
            texts.append(int(inputs["attention_mask"][b].sum()) - n_vis)
        batch, mask = teacher_forced(inputs, targets[i : i + batch_size], pad)
        batches.append(batch)
        masks.append(mask)
    return batches, masks, round(sum(texts) / len(texts)), round(sum(visuals) / len(visuals)), targets


@torch.no_grad()
def greedy_answers(model, processor, records: Sequence[Record], max_new_tokens: int, batch_size: int = 8,
                   name: str = "heldout_data") -> list[str]:
    """Greedy continuations (decoded, special tokens skipped) of the records' prompts by ``model`` as it is."""
    tok = getattr(processor, "tokenizer", processor)
    pad = _pad_id(processor, model)
    out: list[str] = []
    for i in range(0, len(records), batch_size):
        inputs = prompt_inputs(model, processor, records[i : i + batch_size], name)
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        out += tok.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def answer_budget(processor, records: Sequence[Record]) -> int:
    """New tokens a held-out evaluation generates: the longest reference answer's tokens, plus one (end of sequence)."""
    return max(len(answer_ids(processor, r.answer)) for r in records) + 1


def records_accuracy(model, processor, records: Sequence[Record], policy: Any = None, batch_size: int = 8,
                     max_new_tokens: int | None = None) -> float:
    """Exact-match accuracy (``records.normalise_answer`` on both sides) of ``policy``'s greedy continuations
    (None: the unpruned model) against the records' answers."""
    from ..patching import patch

    n = answer_budget(processor, records) if max_new_tokens is None else max_new_tokens
    if policy is None:
        preds = greedy_answers(model, processor, records, n, batch_size)
    else:
        with patch(model, policy):
            preds = greedy_answers(model, processor, records, n, batch_size)
    return sum(normalise_answer(p) == normalise_answer(r.answer) for p, r in zip(preds, records)) / len(records)
