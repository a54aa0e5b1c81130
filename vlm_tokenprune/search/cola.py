"""CoLa per-sample analysis (arXiv 2507.07996): for each example, the chain of layers (skips / loops)
that MCTS finds best, against the full model. Score of a chain: the probability of the example's answer
tokens (teacher forced, one cache-free forward); reward: score - ``length_penalty`` * chain length /
layers. Analysis only: the best chain is found with the answer in hand; serving it would need a
predictor of the chain from the input, which the paper does not give.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .layer_chain import chain_logits
from .mcts import mcts


def answer_probability(model, inputs: dict, mask: torch.Tensor, answer_ids: torch.Tensor, chain: Sequence[int]) -> float:
    """Probability of the answer tokens (positions ``mask`` over the last K positions predict ``answer_ids``)."""
    logits = chain_logits(model, inputs, chain)
    K = mask.shape[1]
    logp = torch.log_softmax(logits[:, logits.shape[1] - K:][mask].float(), -1)
    return float(logp.gather(1, answer_ids[:, None]).sum().exp())


def per_sample(model, processor, examples: Sequence[dict], simulations: int = 200, length_penalty: float = 0.1,
               seed: int = 0, progress: bool = True) -> list[dict]:
    """One row per example: answer, the full model's answer probability, the best chain found and its probability."""
    from tqdm.auto import tqdm

    from ..eval.tiny_vlm import prompts

    tok = processor.tokenizer
    tok.padding_side = "left"
    L = len(model.model.language_model.layers)
    rows = []
    for e in tqdm(list(examples), desc="cola", disable=not progress):
        text = prompts([e["question"]])[0] + " " + e["answer"]
        inputs = dict(processor(images=[e["image"]], text=[text], return_tensors="pt", padding=True))
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        ans = torch.tensor(tok(e["answer"], add_special_tokens=False)["input_ids"])
        mask = torch.zeros(1, len(ans) + 1, dtype=torch.bool)
        mask[0, : len(ans)] = True  # the last len(ans)+1 positions: those before each answer token
        full = tuple(range(L))

        def prob(chain):
            return answer_probability(model, inputs, mask, ans, chain)

        res = mcts(lambda ch: prob(ch) - length_penalty * len(ch) / L, L, simulations=simulations, seed=seed)
        p_full = prob(full)
        rows.append({"seed": e.get("seed"), "qtype": e["qtype"], "question": e["question"], "answer": e["answer"],
                     "full_probability": p_full, "full_reward": p_full - length_penalty,
                     "chain": list(res.chain), "chain_probability": res.reward + length_penalty * len(res.chain) / L,
                     "chain_reward": res.reward, "chains_scored": len(res.evaluated)})
    return rows
