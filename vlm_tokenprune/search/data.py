"""Calibration and held-out data for a search from the synthetic VQA generator (``eval.synthetic``):
calibration = the ``val`` split, held-out = the ``test`` split (disjoint seed ranges), so the search
never sees the examples its result is judged on. For models in the shipped tiny VLM's vocabulary
(``speaks_synthetic``); a user's own data: ``search.records`` / ``search.record_batches``."""
from __future__ import annotations

import torch


def processor_image_size(processor) -> int | None:
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    return size.get("height") or size.get("shortest_edge")


def speaks_synthetic(processor) -> bool:
    """Whether ``processor``'s tokenizer maps every word of the synthetic VQA vocabulary to the shipped tiny VLM's id
    (``eval.tiny_vlm.build_vocab``): only then do the synthetic splits mean anything to the model."""
    from ..eval.tiny_vlm import build_vocab

    tok = getattr(processor, "tokenizer", None)
    if tok is None or not hasattr(tok, "get_vocab"):
        return False
    vocab = tok.get_vocab()
    return all(vocab.get(w) == i for w, i in build_vocab().items())


def calibration_batches(model, processor, n: int, batch_size: int = 8):
    """``(batches, masks, n_text, n_visual)``: teacher-forced prompt + answer batches (left padded), masks (over
    the last K positions) of the positions that predict the answer tokens, and the mean prompt's text / visual token counts (for FLOPs)."""
    from ..eval.synthetic import make_split
    from ..eval.tiny_vlm import prompts

    tok = processor.tokenizer
    tok.padding_side = "left"
    image_id = getattr(model.config, "image_token_index", None) or getattr(model.config, "image_token_id", None)
    examples = make_split("val", n, image_size=processor_image_size(processor))
    batches, masks, texts, visuals = [], [], [], []
    for i in range(0, n, batch_size):
        chunk = examples[i : i + batch_size]
        text = [p + " " + e["answer"] for p, e in zip(prompts([e["question"] for e in chunk]), chunk)]
        inputs = processor(images=[e["image"] for e in chunk], text=text, return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        ids = inputs["input_ids"]
        n_answer = [len(tok(e["answer"], add_special_tokens=False)["input_ids"]) for e in chunk]
        K = max(n_answer) + 1
        mask = torch.zeros(ids.shape[0], K, dtype=torch.bool)  # over the last K positions (left padding: the tail)
        for b, e in enumerate(chunk):
            n_ans = n_answer[b]
            mask[b, K - 1 - n_ans : K - 1] = True  # these positions predict the answer's tokens
            n_vis = int((ids[b] == image_id).sum()) if image_id is not None else 0
            visuals.append(n_vis)
            texts.append(int(inputs["attention_mask"][b].sum()) - n_vis - n_ans)
        batches.append(dict(inputs))
        masks.append(mask)
    return batches, masks, round(sum(texts) / len(texts)), round(sum(visuals) / len(visuals))


def heldout_accuracy(model, processor, policy, n: int, batch_size: int = 8) -> float:
    """Exact-match accuracy of ``policy`` (None: unpruned) on the first ``n`` examples of the ``test`` split."""
    from ..patching import patch
    from ..eval.synthetic import make_split
    from ..eval.tiny_vlm import evaluate

    examples = make_split("test", n, image_size=processor_image_size(processor))
    if policy is None:
        return evaluate(model, processor, examples, batch_size)["all"]
    with patch(model, policy):
        return evaluate(model, processor, examples, batch_size)["all"]
