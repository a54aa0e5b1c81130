"""One tiny LLaVA-1.5 in two code bases, with the same weights: the original ``LlavaLlamaForCausalLM``
(llava-torch 1.2.x on transformers 4.36, its own virtual environment) and HF ``LlavaForConditionalGeneration``
(transformers 5.x, the main environment). The two never load in one interpreter, so vision-site stages are
compared through ``hf_reference.json``: what each ``CASES`` policy gives on the HF twin (kept positions, the
tower's token counts, logits, greedy tokens), written by ``python tests/llava_original/hf_twin.py`` in the main
environment and checked there by ``tests/test_llava_original_twin.py`` (it recomputes the file: a stale file
fails), and on the original code base by ``test_llava_original_vision.py``.

Weights: every parameter is drawn from a generator seeded by its code-base-neutral name (``canonical``), so
both builds hold the same numbers whatever each code base's init does. Both splice the same sequence: the
original's one ``IMAGE_TOKEN_INDEX`` placeholder becomes the 16 features where HF has 16 ``image_token_id``
placeholders, so positions and logits line up one to one. Nothing here imports ``llava`` or ``vlm_tokenprune``
at module level.
"""
from __future__ import annotations

import json
import os
import zlib

import torch

CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
            patch_size=8, projection_dim=32, layer_norm_eps=1e-5, hidden_act="quick_gelu")
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=False)
SELECT_LAYER = -2  # hidden_states[-2] of 4 layers: the output of encoder layer 2
SELECT = {"patch": "default", "cls_patch": "full"}  # original mm_vision_select_feature -> HF select strategy
PATCHES = 16
HF_IMAGE_TOKEN = 127
BOS, PAD = 1, 0
PROMPT = [5, 6, "img", 7, 8, 9]
STEPS = 6  # greedy tokens compared
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_reference.json")

# (select feature, policy): every vision-site method of the HF LLaVA adapter, alone and before an LLM stage
CASES = [
    ("patch", "flowcut_vit:tokens=4"),
    ("patch", "flowcut_vit:tokens=8,positions=gaps"),
    ("patch", "mctf:layer=1,tokens=6"),
    ("patch", "mctf:layer=1,tokens=8,prop_attn=false,bidirection=false"),
    ("patch", "visionzip:tokens=8"),
    ("patch", "visionzip:tokens=6,contextual=0"),
    ("patch", "vispruner:tokens=6"),
    ("patch", "vispruner:tokens=8,important_ratio=0.75+fastv:layer=2,tokens=4"),
    ("patch", "flowcut_vit:tokens=8+fastv:layer=2,tokens=5"),
    ("cls_patch", "visionzip:tokens=8"),
    ("cls_patch", "flowcut_vit:tokens=6"),
]


def canonical(name: str) -> str:
    """A parameter's name in either code base -> one neutral name (``text.``, ``vision.``, ``proj.``, ``lm_head.``)."""
    for prefix, to in (("model.language_model.", "text."), ("model.vision_tower.vision_tower.vision_model.", "vision."),
                       ("model.vision_tower.vision_model.", "vision."), ("model.vision_tower.", "vision."), ("model.multi_modal_projector.linear_1.", "proj.1."),
                       ("model.multi_modal_projector.linear_2.", "proj.2."), ("model.mm_projector.0.", "proj.1."),
                       ("model.mm_projector.2.", "proj.2."), ("model.", "text.")):
        if name.startswith(prefix):
            return to + name[len(prefix):]
    return name


def fill(model: torch.nn.Module) -> None:
    """Every parameter from a generator seeded by its canonical name: norms 1 + 0.1 N(0, 1), the rest 0.15 N(0, 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            c = canonical(name)
            g = torch.Generator().manual_seed(zlib.crc32(c.encode()))
            x = torch.randn(p.shape, generator=g, dtype=torch.float32)
            is_norm = ("norm" in c or "layrnorm" in c) and c.endswith("weight")
            p.copy_(1 + 0.1 * x if is_norm else 0.15 * x)


def image() -> torch.Tensor:
    return torch.randn(1, 3, CLIP["image_size"], CLIP["image_size"], generator=torch.Generator().manual_seed(7))


def cases() -> list[tuple[str, str]]:
    return list(CASES)


# -- the original code base (llava-torch, transformers 4.36) -----------------------------------------------
def save_clip(folder: str) -> str:
    """The tower's config (and a processor) in ``folder``: llava builds ``CLIPVisionModel.from_pretrained`` from it."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    if not os.path.exists(os.path.join(folder, "config.json")):
        CLIPVisionModel(CLIPVisionConfig(**CLIP)).save_pretrained(folder)
        side = CLIP["image_size"]
        CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(folder)
    return folder


def build_original(clip_dir: str, select: str = "patch", attn: str = "eager"):
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    cfg = LlavaConfig(**TEXT, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2, mm_vision_tower=clip_dir,
                      mm_hidden_size=CLIP["hidden_size"], mm_projector_type="mlp2x_gelu",
                      mm_vision_select_layer=SELECT_LAYER, mm_vision_select_feature=select, image_aspect_ratio="pad",
                      mm_use_im_start_end=False, mm_patch_merge_type="flat")
    model = LlavaLlamaForCausalLM._from_config(cfg, attn_implementation=attn)
    model.get_model().get_vision_tower().load_model()
    fill(model)
    return model.eval()


def original_ids() -> torch.Tensor:
    from llava.constants import IMAGE_TOKEN_INDEX

    return torch.tensor([[BOS] + [IMAGE_TOKEN_INDEX if p == "img" else p for p in PROMPT]])


# -- the HF twin (transformers 5.x) ---------------------------------------------------------------------
def build_hf(select: str = "patch", attn: str = "eager"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=LlamaConfig(
        **TEXT, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2), image_token_index=HF_IMAGE_TOKEN,
        vision_feature_layer=SELECT_LAYER, vision_feature_select_strategy=SELECT[select], projector_hidden_act="gelu",
        image_seq_length=PATCHES + (select == "cls_patch"), tie_word_embeddings=False)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn)
    fill(model)
    return model.eval()


def hf_ids(select: str) -> torch.Tensor:
    per = PATCHES + (select == "cls_patch")
    ids = [BOS]
    for p in PROMPT:
        ids += [HF_IMAGE_TOKEN] * per if p == "img" else [p]
    return torch.tensor([ids])


def record(logits: torch.Tensor, generated: list[int], margins: list[float], trace=None) -> dict:
    out = {"last_logits": [round(float(v), 7) for v in logits[0, -1]],
           "position_norms": [round(float(v), 6) for v in logits[0].norm(dim=-1)],
           "generated": generated, "min_margin": round(min(margins), 6)}
    if trace is not None:
        out["kept_positions"] = [s.kept_positions[0] for s in trace.stages]
        out["vision_tokens_per_layer"] = trace.stages[0].vision_tokens_per_layer
    return out


def greedy(forward, steps: int = STEPS) -> tuple[list[int], list[float]]:
    """Greedy tokens of ``generate`` and the top-1 / top-2 margin of each step's logits (``forward`` -> scores)."""
    scores = forward(steps)
    toks, margins = [], []
    for s in scores:
        top = s[0].float().topk(2).values
        toks.append(int(s[0].argmax()))
        margins.append(float(top[0] - top[1]))
    return toks, margins


def hf_reference() -> dict:
    """What every case gives on the HF twin (and the plain models), keyed ``"<select>|<policy>"``."""
    import vlm_tokenprune as vtp

    torch.set_num_threads(1)
    out = {}
    for select in sorted({s for s, _ in CASES}):
        model = build_hf(select)
        ids, pixels = hf_ids(select), image()

        def run(steps, model=model, ids=ids, pixels=pixels):
            with torch.no_grad():
                g = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=steps, do_sample=False,
                                   eos_token_id=None, output_scores=True, return_dict_in_generate=True)
            return g.scores

        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixels).logits
        out[f"{select}|plain"] = record(logits, *greedy(run))
        for sel, policy in CASES:
            if sel != select:
                continue
            with vtp.patch(model, policy) as h:
                with torch.no_grad():
                    logits = model(input_ids=ids, pixel_values=pixels).logits
                trace = h.last_trace()
                out[f"{select}|{policy}"] = record(logits, *greedy(run), trace=trace)
    return out


if __name__ == "__main__":
    ref = hf_reference()
    with open(REFERENCE, "w") as f:
        json.dump(ref, f, indent=0, sort_keys=True)
        f.write("\n")
    print(f"wrote {REFERENCE}: {len(ref)} entries")
