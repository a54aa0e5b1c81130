"""``search_policy(calibration_data=, heldout_data=)`` / ``vlm-tokenprune search --calibration-data F --heldout-data F``
(issue 20): a user's own JSONL records replace the synthetic splits. On the shipped tiny VLM with records built from
synthetic images saved as PNG: the search runs on the file (the synthetic generator is never called), is
deterministic, writes a best.yaml ``patch()`` takes; unanswered records are teacher-forced on the unpruned model's
greedy continuation; held-out accuracy is a hand loop of greedy generate + normalised exact match; every bad file is
refused by name before a model is loaded. ``--model PATH``: a random-weight LLaVA with its own (non-synthetic)
tokenizer, saved with ``save_pretrained`` and loaded offline."""
from __future__ import annotations

import json

import pytest
import torch

import vlm_tokenprune as vtp
from vlm_tokenprune import InputError
from vlm_tokenprune.cli import main
from vlm_tokenprune.eval.flops import structural_flops
from vlm_tokenprune.eval.synthetic import QTYPES, make_example
from vlm_tokenprune.eval.tiny_vlm import load_tiny_vlm, prompts
from vlm_tokenprune.search.api import search_policy
from vlm_tokenprune.search.record_batches import record_calibration_batches
from vlm_tokenprune.search.records import read_records

SMALL = dict(generations=1, offspring=3, levels=8, progress=False, heldout_top=1, seed_presets=False, trade=0.0)


def write_records(folder, name, seeds, *, answers="all", wrong=(), shout=()):
    """A JSONL file of synthetic examples (images saved as PNG under ``folder/img``); ``answers``: "all", "none" or
    "even" (every other record); ``wrong``: indices whose answer is replaced; ``shout``: indices upper-cased + padded."""
    (folder / "img").mkdir(exist_ok=True)
    lines = []
    for i, s in enumerate(seeds):
        e = make_example(s, QTYPES[i % len(QTYPES)], 128)
        e["image"].save(folder / "img" / f"{s}.png")
        rec = {"image": f"img/{s}.png", "prompt": prompts([e["question"]])[0]}
        if answers == "all" or (answers == "even" and i % 2 == 0):
            rec["answer"] = "nothing" if i in wrong else (f"  {e['answer'].upper()} " if i in shout else e["answer"])
        lines.append(json.dumps(rec))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_tiny_vlm()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("records")
    cal = write_records(d, "cal.jsonl", range(5000, 5008), answers="even")
    first = json.loads(cal.read_text().splitlines()[0])  # line 1 again (its image path spelt otherwise), after another
    (d / "dup.jsonl").write_text(json.dumps({"image": "./" + first["image"], "prompt": "x", "answer": "y"}) + "\n"
                                 + json.dumps({**first, "image": "./" + first["image"]}) + "\n")
    return {"dup": d / "dup.jsonl", "cal": cal,
            "cal2": write_records(d, "cal2.jsonl", range(7000, 7008), answers="even"),
            "held": write_records(d, "held.jsonl", range(6000, 6006), wrong=(1, 4), shout=(2,)), "dir": d}


@pytest.fixture(scope="module")
def searched(tiny, files, tmp_path_factory):
    """One search on the user files, the synthetic generator made to fail if it is called at all."""
    import vlm_tokenprune.eval.synthetic as synthetic

    model, processor = tiny
    out = tmp_path_factory.mktemp("out")
    mp = pytest.MonkeyPatch()
    mp.setattr(synthetic, "make_split", lambda *a, **k: pytest.fail("the synthetic generator was called"))
    try:
        res = search_policy(model, processor, "flops=0.4", calibration_data=files["cal"], heldout_data=files["held"],
                            out=out, **SMALL)
    finally:
        mp.undo()
    return res, out


def test_search_runs_on_the_user_file_and_writes_a_policy_patch_takes(tiny, searched, files):
    model, _ = tiny
    res, out = searched
    assert res.policy is not None and res.flops_ratio <= 0.4
    pol = vtp.Policy.from_file(str(out / "best.yaml"))
    assert pol == vtp.Policy.parse(res.policy)
    with vtp.patch(model, str(out / "best.yaml")) as h:
        assert h.policy == pol
    summary = json.loads((out / "pareto.json").read_text())
    assert summary["data"]["calibration"] == str(files["cal"]) and summary["data"]["heldout"] == str(files["held"])
    assert summary["data"]["calibration_examples"] == 8 and summary["data"]["heldout_examples"] == 6
    assert summary["n_visual"] == 256  # the tiny VLM's 16 x 16 grid, counted on the file's prompts
    assert structural_flops(model.config, pol, summary["n_text"], 256)["ratio"] == pytest.approx(res.flops_ratio)
    assert str(files["held"]) in (out / "pareto.md").read_text()


def test_search_on_a_user_file_is_deterministic_for_a_seed(tiny, searched, files, tmp_path):
    model, processor = tiny
    again = search_policy(model, processor, "flops=0.4", calibration_data=files["cal"], heldout_data=files["held"],
                          out=tmp_path, **SMALL)
    first = searched[0]
    assert (again.policy, again.fitness, again.accuracy) == (first.policy, first.fitness, first.accuracy)
    assert [(r["policy"], r["fitness"]) for r in again.rows] == [(r["policy"], r["fitness"]) for r in first.rows]


def test_calibration_comes_from_the_file(tiny, searched, files):
    """Another file (other examples) gives other divergences for the same candidates."""
    model, processor = tiny
    other = search_policy(model, processor, "flops=0.4", calibration_data=files["cal2"], heldout=0, **SMALL)
    first = {r["policy"]: r["fitness"] for r in searched[0].rows if r["levels"] is not None}
    shared = [(first[r["policy"]], r["fitness"]) for r in other.rows if r["policy"] in first and r["policy"] is not None]
    assert shared and all(a != pytest.approx(b, rel=1e-6, abs=0) for a, b in shared)


def test_resume_on_a_user_file_equals_the_straight_run_and_refuses_another_file(tiny, files, tmp_path):
    model, processor = tiny
    kw = dict(calibration_data=files["cal"], heldout=0, **{**SMALL, "generations": 2})
    straight = search_policy(model, processor, "flops=0.4", out=tmp_path / "a", **kw)
    search_policy(model, processor, "flops=0.4", out=tmp_path / "b", **{**kw, "generations": 1})
    resumed = search_policy(model, processor, "flops=0.4", out=tmp_path / "b", resume=True, **kw)
    assert (resumed.policy, resumed.fitness) == (straight.policy, straight.fitness)
    lines = files["cal"].read_text().splitlines()  # the same prompts (same token counts), line 1's answer changed
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join([json.dumps({**json.loads(lines[0]), "answer": "blue circle"}), *lines[1:]]) + "\n")
    for image in (files["dir"] / "img").iterdir():
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / image.name).write_bytes(image.read_bytes())
    with pytest.raises(ValueError, match="a checkpoint of another search"):  # the records are part of the signature
        search_policy(model, processor, "flops=0.4", out=tmp_path / "b", resume=True, **{**kw, "calibration_data": other})


@torch.no_grad()
def test_unanswered_records_are_teacher_forced_on_the_unpruned_greedy_continuation(tiny, files):
    from PIL import Image

    model, processor = tiny
    records = read_records(files["cal"])
    batches, masks, _, n_visual, targets = record_calibration_batches(model, processor, records, 4, answer_tokens=3)
    assert n_visual == 256
    tok = processor.tokenizer
    for i, r in enumerate(records):
        if r.answer is not None:
            assert targets[i] == tok(r.answer, add_special_tokens=False)["input_ids"]
            continue
        inputs = processor(images=[Image.open(r.images[0]).convert("RGB")], text=[r.prompt], return_tensors="pt")
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        greedy = gen[0, inputs["input_ids"].shape[1]:].tolist()
        eos = model.generation_config.eos_token_id
        if eos in greedy:
            greedy = greedy[: greedy.index(eos) + 1]
        assert targets[i] == greedy and len(greedy) >= 1
    for b, (batch, mask) in enumerate(zip(batches, masks)):  # the teacher-forced tail is the target
        for row in range(mask.shape[0]):
            t = targets[4 * b + row]
            assert batch["input_ids"][row, -len(t):].tolist() == t and int(mask[row].sum()) == len(t)
            assert bool(mask[row, -1]) is False  # the last position predicts nothing


@torch.no_grad()
def test_heldout_accuracy_equals_a_hand_loop_of_greedy_exact_match(tiny, searched, files):
    from PIL import Image

    model, processor = tiny
    res = searched[0]
    records = read_records(files["held"], require_answer=True)
    tok = processor.tokenizer
    n_new = max(len(tok(r.answer, add_special_tokens=False)["input_ids"]) for r in records) + 1
    hits = []
    with vtp.patch(model, res.policy):
        for r in records:
            inputs = processor(images=[Image.open(r.images[0]).convert("RGB")], text=[r.prompt], return_tensors="pt")
            gen = model.generate(**inputs, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
            text = tok.decode(gen[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            hits.append(text.strip().lower() == r.answer.strip().lower())
    assert res.accuracy == sum(hits) / len(hits)
    assert 0 < res.accuracy < 1  # two answers are wrong on purpose; the shouted one counts (normalised)


class MiniQwenProcessor:
    """Qwen2VLProcessor's work for images (transformers' own class needs torchvision for its video half): a
    word-level tokenizer with Qwen's special tokens at the tiny config's ids, the PIL Qwen2-VL image processor
    (patch 4, merge 2, 64 x 64 px -> 8 x 8 = 64 LLM tokens), ``<|image_pad|>`` expanded per image grid."""

    image_token = "<|image_pad|>"
    SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                "<|vision_end|>")

    def __init__(self, model):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        vocab = {w: i for i, w in enumerate(list(self.SPECIALS) + WORDS)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in self.SPECIALS])
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                 unk_token="<|endoftext|>", padding_side="left")
        self.image_processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                        size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64})
        import inspect

        self.token_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters  # newer transformers

    def __call__(self, images, text, return_tensors="pt", padding=True):
        px = self.image_processor(images=images, return_tensors="pt")
        counts = iter((px["image_grid_thw"].prod(-1) // 4).tolist())
        expanded = []
        for t in text:
            parts = t.split(self.image_token)
            expanded.append(parts[0] + "".join(self.image_token * next(counts) + p for p in parts[1:]))
        enc = dict(self.tokenizer(expanded, return_tensors="pt", padding=padding))
        if self.token_types:
            enc["mm_token_type_ids"] = (enc["input_ids"] == 3).long()
        return {**enc, **px}


def _model_and_processor(family, tiny):
    if family == "llava":
        return tiny
    from vlm_tokenprune.eval.tiny_models import build_tiny_qwen2_vl

    model = build_tiny_qwen2_vl(vocab=64)
    return model, MiniQwenProcessor(model)


def _qwen_records(folder, n, answer=lambda i: "red" if i % 2 else None):
    write_records(folder, "unused.jsonl", range(5000, 5000 + n))  # draws the PNGs
    prompt = "user : <|vision_start|><|image_pad|><|vision_end|> what colour is the circle ? assistant :"
    return [{"image": f"img/{5000 + i}.png", "prompt": "user " * (i % 3) + prompt,
             **({"answer": answer(i)} if answer(i) else {})} for i in range(n)]


def test_records_with_several_images_and_a_placeholder_mismatch(tiny, files):
    """A list of images fills the prompt's placeholders in order; a prompt whose placeholders do not match its images is
    refused naming the records' lines (the processor's own message), before the search starts."""
    model, processor = tiny
    d = files["dir"]
    two = {"image": ["img/5000.png", "img/5001.png"], "prompt": "USER: <image>\n<image>\nwhat colour is the circle? "
           "ASSISTANT:", "answer": "red"}
    one = {"image": "img/5002.png", "prompt": "USER: <image>\nwhat colour is the circle? ASSISTANT:"}
    (d / "multi.jsonl").write_text(json.dumps(two) + "\n" + json.dumps(one) + "\n")
    batches, _, _, n_visual, targets = record_calibration_batches(model, processor, read_records(d / "multi.jsonl"), 2)
    assert n_visual == (2 * 256 + 256) / 2 and batches[0]["pixel_values"].shape[0] == 3
    assert targets[0] == processor.tokenizer("red", add_special_tokens=False)["input_ids"]
    (d / "mismatch.jsonl").write_text(json.dumps({**two, "prompt": one["prompt"]}) + "\n")
    with pytest.raises(InputError) as e:
        record_calibration_batches(model, processor, read_records(d / "mismatch.jsonl"), 2)
    assert e.value.field == "calibration_data[lines 1]" and "placeholder" in str(e.value)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@torch.no_grad()
def test_teacher_forced_batches_equal_each_record_alone(family, tiny, files, tmp_path):
    """The re-padded batch (prompts of several lengths, targets of several lengths: more left padding, targets on the
    right) gives each record's target positions the log-probs of that record run alone, unpadded (M-RoPE positions
    from the attention mask on Qwen2-VL)."""
    import torch.nn.functional as F
    from PIL import Image

    from vlm_tokenprune.search.fitness import build_calibration

    model, processor = _model_and_processor(family, tiny)
    if family == "llava":
        records = read_records(files["cal"])[:4]
    else:
        (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _qwen_records(tmp_path, 4)))
        records = read_records(tmp_path / "q.jsonl")
    batches, masks, _, n_visual, targets = record_calibration_batches(model, processor, records, 4, answer_tokens=3)
    assert n_visual == (256 if family == "llava" else 64)
    assert len({len(t) for t in targets}) > 1 or family == "llava"
    cal = build_calibration(model, batches, masks)
    ref = cal.reference[0]
    offset = 0
    for r, t in zip(records, targets):
        one = dict(processor(images=[Image.open(r.images[0]).convert("RGB")], text=[r.prompt], return_tensors="pt"))
        n = one["input_ids"].shape[1]
        tail = torch.tensor([t])
        one["input_ids"] = torch.cat([one["input_ids"], tail], 1)
        one["attention_mask"] = torch.ones_like(one["input_ids"])
        if "mm_token_type_ids" in one:
            one["mm_token_type_ids"] = torch.cat([one["mm_token_type_ids"], torch.zeros_like(tail)], 1)
        alone = F.log_softmax(model(**one, use_cache=False).logits[0, n - 1 : n - 1 + len(t)].float(), -1)
        torch.testing.assert_close(ref[offset : offset + len(t)], alone, atol=1e-4, rtol=1e-4)
        offset += len(t)
    assert offset == ref.shape[0]


def test_search_on_qwen2_vl_counts_its_own_geometry(tmp_path):
    """Another family through the Python API: Qwen2-VL's visual tokens (64 per image here) and text counts set the
    FLOPs constraint; held-out accuracy from its records."""
    model, processor = _model_and_processor("qwen2_vl", None)
    recs = _qwen_records(tmp_path, 6)
    (tmp_path / "cal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:4]))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({**r, "answer": "red"}) + "\n" for r in recs[4:]))
    res = search_policy(model, processor, "flops=0.7", calibration_data=tmp_path / "cal.jsonl",
                        heldout_data=tmp_path / "held.jsonl", batch_size=2, out=tmp_path / "out",
                        **{**SMALL, "offspring": 2, "levels": 4})
    summary = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert summary["n_visual"] == 64
    assert res.policy is not None and res.flops_ratio <= 0.7
    assert structural_flops(model.config, res.policy, summary["n_text"], 64)["ratio"] == pytest.approx(res.flops_ratio)
    assert res.accuracy is not None


# -- refusals, before any model is loaded ------------------------------------------------------------------------
def _bad_files(d):
    ok = {"image": "img/5000.png", "prompt": "USER: <image>\nwhat is it? ASSISTANT:", "answer": "red"}
    (d / "notimage.png").write_text("not a png")
    cases = {
        "missing": None,
        "bad_json": json.dumps(ok) + "\n{not json\n",
        "not_object": json.dumps([ok]) + "\n",
        "no_image": json.dumps({"prompt": "x"}) + "\n",
        "no_prompt": json.dumps({"image": "img/5000.png"}) + "\n",
        "unknown_key": json.dumps({**ok, "answers": "red"}) + "\n",
        "image_missing": json.dumps({**ok, "image": "img/nosuch.png"}) + "\n",
        "image_empty_list": json.dumps({**ok, "image": []}) + "\n",
        "image_unreadable": json.dumps({**ok, "image": "notimage.png"}) + "\n",
        "empty_prompt": json.dumps({**ok, "prompt": " "}) + "\n",
        "empty_answer": json.dumps({**ok, "answer": ""}) + "\n",
        "no_records": "\n\n",
    }
    paths = {}
    for name, text in cases.items():
        paths[name] = d / f"{name}.jsonl"
        if text is not None:
            paths[name].write_text(text)
    paths["not_utf8"] = d / "not_utf8.jsonl"
    paths["not_utf8"].write_bytes(b'{"image": "img/5000.png", "prompt": "\xff"}\n')
    return paths


BAD = [("missing", "--calibration-data", "is not a file"), ("bad_json", "--calibration-data[line 2]", "not valid JSON"),
       ("not_object", "--calibration-data[line 1]", "not an object"),
       ("no_image", "--calibration-data[line 1].image", "missing"),
       ("no_prompt", "--calibration-data[line 1].prompt", "missing"),
       ("unknown_key", "--calibration-data[line 1].answers", "allowed: image, prompt, answer"),
       ("image_missing", "--calibration-data[line 1].image", "is not a file"),
       ("image_empty_list", "--calibration-data[line 1].image", "non-empty list"),
       ("image_unreadable", "--calibration-data[line 1].image", "not a readable image"),
       ("empty_prompt", "--calibration-data[line 1].prompt", "non-empty string"),
       ("empty_answer", "--calibration-data[line 1].answer", "leave the key out"),
       ("no_records", "--calibration-data", "holds no records"), ("not_utf8", "--calibration-data", "not UTF-8")]


@pytest.fixture
def no_model_loading(monkeypatch):
    import vlm_tokenprune.eval.loading as loading
    import vlm_tokenprune.eval.tiny_vlm as tiny_vlm

    fail = lambda *a, **k: pytest.fail("a model was loaded before the options were checked")  # noqa: E731
    monkeypatch.setattr(tiny_vlm, "load_tiny_vlm", fail)
    monkeypatch.setattr(loading, "load_vlm", fail)


@pytest.mark.parametrize("case,field,words", BAD)
def test_bad_calibration_files_are_refused_by_name_before_any_model(case, field, words, files, no_model_loading,
                                                                    capsys, tmp_path):
    paths = _bad_files(files["dir"])
    assert main(["search", "--calibration-data", str(paths[case]), "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: {field}:" in err and words in err, err
    with pytest.raises(InputError) as e:  # the Python API: the same check, the argument's own name
        read_records(paths[case])
    assert e.value.field == field.replace("--calibration-data", "calibration_data")


def test_bad_heldout_files_and_options_are_refused_by_name_before_any_model(files, no_model_loading, capsys, tmp_path):
    d = files["dir"]
    unanswered = write_records(d, "unanswered.jsonl", range(6000, 6002), answers="even")
    cases = [
        (["--heldout-data", str(unanswered)], "--heldout-data[line 2].answer", "need an answer"),
        (["--calibration-data", str(files["cal"]), "--heldout-data", str(files["dup"])], "--heldout-data[line 2]",
         "same example (images and prompt) as --calibration-data line 1"),
        (["--answer-tokens", "0"], "--answer-tokens", ">= 1"),
        (["--model", str(tmp_path / "nosuch")], "--model", "neither 'tiny' nor a local checkpoint folder"),
        (["--per-sample", "--heldout-data", str(files["held"])], "--per-sample", "synthetic test split"),
        (["--dtype", "bf16"], "--dtype/--device", "fp32 on the CPU"),
    ]
    for argv, field, words in cases:
        assert main(["search", "--out", str(tmp_path), "--no-progress", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {field}:" in err and words in err, (argv, err)


def test_identical_records_are_refused_in_the_api_before_the_model_runs(tiny, files, monkeypatch):
    model, processor = tiny
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("the model ran"))
    for kw, field in ((dict(heldout_data=files["dup"]), "heldout_data[line 2]"), (dict(answer_tokens=0), "answer_tokens"),
                      (dict(heldout_data=files["held"], heldout_fn=lambda p: 0.0), "heldout_data")):
        with pytest.raises(InputError) as e:
            search_policy(model, processor, "flops=0.4", calibration_data=files["cal"], **kw, **SMALL)
        assert e.value.field == field


# -- --model PATH: a random-weight LLaVA with its own tokenizer, saved and loaded offline -------------------------
WORDS = ["user", "assistant", ":", "?", "what", "colour", "shape", "is", "the", "thing", "red", "blue", "green", "circle",
         "square", "triangle", "a"]


def save_random_llava(folder):
    """A random-weight LLaVA (CLIP 2 x 32 at 96 px / 8 -> 144 visual tokens, Llama 4 x 32) and a LlavaProcessor with
    a word-level tokenizer over ``WORDS`` (not the synthetic vocabulary), saved with ``save_pretrained``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

    from vlm_tokenprune.eval.tiny_vlm import SPECIALS, tiny_vlm_config

    vocab = {w: i for i, w in enumerate(list(SPECIALS) + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")
    image_processor = CLIPImageProcessor(size={"height": 96, "width": 96}, crop_size={"height": 96, "width": 96},
                                         do_center_crop=False)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=fast, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>")
    torch.manual_seed(0)
    cfg = tiny_vlm_config(text_hidden=32, text_layers=4, text_heads=2, text_kv_heads=1, text_intermediate=64,
                          vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


def test_model_path_any_hf_llava_folder_with_user_data(tmp_path, capsys):
    ckpt = tmp_path / "llava"
    model = save_random_llava(ckpt)
    d = tmp_path / "data"
    d.mkdir()
    write_records(d, "unused.jsonl", range(5000, 5006))  # draws the PNGs
    colours = ["red", "blue", "green"]
    shapes = ["circle", "square", "triangle"]

    def record(i):
        return {"image": f"img/{5000 + i}.png", "prompt": f"USER: <image>\nwhat colour is the {shapes[i % 3]}? ASSISTANT:",
                **({"answer": colours[i % 3]} if i % 2 else {})}

    (d / "cal.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(4)))
    (d / "held.jsonl").write_text("".join(json.dumps({**record(i), "answer": "red"}) + "\n" for i in (4, 5)))
    base = ["search", "--model", str(ckpt), "--budget", "flops=0.6", "--no-progress", "--generations", "1",
            "--offspring", "2", "--levels", "4", "--no-seeds", "--trade", "0", "--batch-size", "2"]
    assert main(base + ["--out", str(tmp_path / "o0")]) == 2  # no calibration data: refused, the model not loaded
    assert "error: --calibration-data:" in capsys.readouterr().err
    assert main(base + ["--calibration-data", str(d / "cal.jsonl"), "--out", str(tmp_path / "o1")]) == 2
    assert "error: --heldout-data:" in capsys.readouterr().err  # held-out data or --heldout 0
    out = tmp_path / "o2"
    rc = main(base + ["--calibration-data", str(d / "cal.jsonl"), "--heldout-data", str(d / "held.jsonl"),
                      "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "pareto.json").read_text())
    assert summary["n_visual"] == 144  # this model's own geometry: 12 x 12 patches
    best = vtp.Policy.from_file(str(out / "best.yaml"))
    assert structural_flops(model.config, best, summary["n_text"], 144)["ratio"] == pytest.approx(
        summary["best"]["flops_ratio"]) and summary["best"]["flops_ratio"] <= 0.6
    assert summary["best"]["heldout_accuracy"] is not None and summary["data"]["heldout_examples"] == 2

    from vlm_tokenprune.eval.loading import load_vlm

    loaded, processor = load_vlm(ckpt)  # the Python API refuses the synthetic splits for this model by name too
    for kw, field in ((dict(), "calibration_data"), (dict(calibration_data=d / "cal.jsonl"), "heldout")):
        with pytest.raises(InputError) as e:
            search_policy(loaded, processor, "flops=0.6", **kw, **SMALL)
        assert e.value.field == field


def test_catalogue_rows_of_search_data_name_existing_tests():
    from kit.catalogue import assert_rows_name_existing_tests, catalogue_rows

    assert all("search" in catalogue_rows()[n] for n in (180, 181, 182))
    assert_rows_name_existing_tests((180, 181, 182))
