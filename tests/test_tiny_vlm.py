"""The shipped trained tiny VLM (vlm_tokenprune/assets/tiny_vlm), its synthetic data and its processor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm_tokenprune.eval import synthetic as S
from vlm_tokenprune.eval import tiny_vlm as T

N_PER_TYPE = 30  # fixed test subset: test seeds 0 .. 5*N_PER_TYPE-1, question types balanced


# ------------------------------------------------------------------------------------- generator
def test_generator_is_deterministic():
    for seed in (0, 1, 12345, 2_000_000_007):
        a, b = S.make_example(seed), S.make_example(seed)
        assert (a["question"], a["answer"], a["qtype"]) == (b["question"], b["answer"], b["qtype"])
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    x, y = S.make_split("val", 10), S.make_split("val", 10)
    assert [e["question"] for e in x] == [e["question"] for e in y]
    assert S.make_example(0)["question"] != S.make_example(1)["question"] or not np.array_equal(
        np.asarray(S.make_example(0)["image"]), np.asarray(S.make_example(1)["image"]))


def test_splits_disjoint_and_cover_types():
    seeds = {name: set(S.split_seeds(name, 1000)) for name in ("train", "val", "test")}
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"] and not seeds["val"] & seeds["test"]
    ex = S.make_split("test", 50)
    assert {e["qtype"] for e in ex} == set(S.QTYPES)
    assert {"color", "location", "exists", "count", "read"} <= set(S.QTYPES)
    for e in ex:
        assert e["image"].size == (S.RENDER_SIZE, S.RENDER_SIZE) and e["image"].mode == "RGB"
    with pytest.raises(ValueError):
        S.make_split("dev", 3)


def test_answers_are_consistent_with_scene():
    vocab = set(S.vocabulary())
    for seed in range(300):
        scene = S.make_scene(seed)
        objs = scene["objects"]
        pairs = [(c, s) for c, s, *_ in objs.values()]
        assert len(set(pairs)) == len(pairs) and scene["digit_cell"] not in objs
        rng = np.random.default_rng(seed)
        for qt in S.QTYPES:
            q, a, _ = S.ask(scene, qt, rng)
            assert set(q.split()) <= vocab and set(a.split()) <= vocab
            if qt == "location":
                cell = [c for c, o in objs.items() if f"the {o[0]} {o[1]} ?" in q][0]
                assert a == S.cell_name(cell)
            if qt == "exists":
                words = q.split()
                assert (a == "yes") == ((words[3], words[4]) in pairs)
            if qt == "count":
                shape = [s for s in S.SHAPES if S.PLURALS[s] in q][0]
                assert a == str(sum(s == shape for _, s in pairs))
            if qt == "read":
                assert a == scene["digit"]
    # location questions reach the top rows
    tops = [e for e in S.make_split("test", 500) if e["qtype"] == "location" and e["answer"].startswith("top")]
    assert tops


# ------------------------------------------------------------------------------ tokenizer / processor
def test_tokenizer_processor_round_trip(tmp_path):
    from transformers import LlavaProcessor

    proc = T.build_processor()
    tok = proc.tokenizer
    assert max(tok.get_vocab().values()) < T.VOCAB_SIZE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (T.PAD_ID, T.BOS_ID, T.EOS_ID, T.UNK_ID)
    assert tok.convert_tokens_to_ids("<image>") == T.IMAGE_TOKEN_ID
    for e in S.make_split("test", 10):
        ids = tok(e["question"], add_special_tokens=False)["input_ids"]
        assert T.UNK_ID not in ids
        assert tok.decode(ids) == e["question"]
        assert tok.decode(tok(e["answer"], add_special_tokens=False)["input_ids"]) == e["answer"]

    proc.save_pretrained(tmp_path)
    again = LlavaProcessor.from_pretrained(tmp_path, local_files_only=True)
    ex = S.make_split("test", 3)
    texts = T.prompts([e["question"] for e in ex])
    a = proc(images=[e["image"] for e in ex], text=texts, return_tensors="pt", padding=True)
    b = again(images=[e["image"] for e in ex], text=texts, return_tensors="pt", padding=True)
    assert set(a) >= {"input_ids", "attention_mask", "pixel_values"}
    for k in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(a[k], b[k])
    assert a["pixel_values"].shape == (3, 3, S.IMAGE_SIZE, S.IMAGE_SIZE)
    assert ((a["input_ids"] == T.IMAGE_TOKEN_ID).sum(1) == T.GRID_TOKENS).all()
    assert a["input_ids"][0, 0] == T.BOS_ID or (a["attention_mask"][0] == 0).any()  # BOS after any left padding
    first = a["attention_mask"].argmax(1)
    assert all(a["input_ids"][r, first[r]] == T.BOS_ID for r in range(3))


# ---------------------------------------------------------------------------------- shipped model
@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return T.load_tiny_vlm()


def test_shipped_model_is_real_llava(shipped):
    from transformers import LlavaForConditionalGeneration

    model, processor = shipped
    assert isinstance(model, LlavaForConditionalGeneration)
    assert model.dtype == torch.float32
    cfg = model.config
    assert cfg.text_config.model_type == "llama" and cfg.vision_config.model_type == "clip_vision_model"
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    assert grid * grid == T.SHIPPED_GRID_TOKENS == 256  # 16 x 16 (warm-started from a 12 x 12 model: scripts/train_tiny_vlm.py)
    assert cfg.text_config.vocab_size == T.VOCAB_SIZE and cfg.image_token_id < T.VOCAB_SIZE
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_shipped_model_accuracy_per_type(shipped):
    model, processor = shipped
    examples = S.make_split("test", N_PER_TYPE * len(S.QTYPES))
    acc = T.evaluate(model, processor, examples, batch_size=16)
    assert set(S.QTYPES) <= set(acc)
    low = {k: v for k, v in acc.items() if v < 0.9}
    assert not low, f"per-type accuracy below 0.9: {acc}"


def test_batched_answers_equal_single(shipped):
    model, processor = shipped
    ex = S.make_split("test", 10)
    imgs, qs = [e["image"] for e in ex], [e["question"] for e in ex]
    assert T.answer(model, processor, imgs, qs, batch_size=8) == T.answer(model, processor, imgs, qs, batch_size=1)
