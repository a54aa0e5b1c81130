"""lmms-eval plugin: any Hugging Face VLM, pruned by a vlm_tokenprune policy, as lmms-eval model ``vlm_tokenprune``.

Installed through the entry point group ``lmms_eval.models`` (``setup.py``; lmms-eval >= 0.7 reads it),
so after ``pip install "vlm_tokenprune[eval]"``::

    python -m lmms_eval --model vlm_tokenprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,policy=fastv:keep=0.25 --tasks gqa --batch_size 8

Model arguments (``--model_args key=value,...``):

- ``pretrained``: a local checkpoint folder or hub id, any family ``AutoModelForImageTextToText`` loads
  (``tiny`` = the shipped trained tiny LLaVA); ``dtype`` (``auto``: bf16 on GPU, fp32 on CPU),
  ``attn_implementation``, ``device``, ``device_map``, ``trust_remote_code``, ``revision``.
- ``policy``: a policy string (``fastv:layer=2;keep=0.25``: lmms-eval splits model_args on commas, so
  write ``;`` for the commas inside the policy, or quote it: ``policy="fastv:layer=2,keep=0.25"``), a
  JSON object, or ``policy_file`` = a JSON / YAML policy file. Neither: the unpruned model.
  ``backend`` = ``auto`` / ``torch`` / ``triton`` (``patch(..., backend=)``).
- ``batch_size``, ``chat_template`` (a Jinja template overriding the processor's), ``prompt_format``
  (used when the processor has no chat template; default ``"USER: {context} ASSISTANT:"``, the
  llava-hf LLaVA-1.5 and shipped tiny-model format), ``use_cache``, ``max_new_tokens`` (default when a
  task gives none).

Requests are sorted by length and batched (left padding) per identical generation kwargs, as lmms-eval's
own HF wrappers do; ``until`` stop strings cut the decoded text. Data parallel runs use ``accelerate
launch`` (one process per GPU, each on ``cuda:<local rank>``).

What the run records (so a results file shows that pruning happened; lmms-eval 0.7.3 offers models no
config field of their own, so the plugin uses the two places it does expose):

- ``results["throughput"]``: ``avg_vtp_visual_tokens_in`` and, per token stage ``i`` of the policy,
  ``avg_vtp_stage<i>_<criterion>_kept_visual_tokens``: mean visual tokens per request before pruning and
  kept after each stage (over every prefill this process ran; logged through lmms-eval's ``log_metrics``
  when lmms-eval calls ``clean()``), with the generation time and tokens lmms-eval's own wrappers log.
- the output folder: ``<output_path>/<pretrained>__<policy tag>`` (``tiny__fastv-layer=2_keep=0.25``;
  ``__unpruned`` without a policy), also written as ``model_name_sanitized`` in the results JSON. lmms-eval
  names the folder from ``pretrained=`` only; the plugin appends the tag when lmms-eval logs the run's
  arguments (a wrapper around ``GeneralConfigTracker.log_experiment_args``, installed the first time the
  model is built, never at import, and acting only on runs of this model).
- ``VLMTokenPrune.pruning_summary()`` (the same figures and the policy string) and one log line at the end.

A policy split by lmms-eval's comma split (``policy=fastv:layer=2,keep=0.25`` arrives as ``policy=fastv:layer=2``
plus an unknown model argument ``keep=0.25``) is refused with the fix, before any model is loaded.

The offline task ``vtp_synthetic_vqa`` (``TASKS_DIR``, pass it to ``--include_path``) runs the shipped
tiny model's synthetic test split: see ``lmms_tasks/vtp_synthetic_vqa.yaml``.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from .. import patch
from ..errors import InputError
from ..eval.profiler import PLAIN_PROMPT, build_prompt, load_vlm, resolve_device, to_device
from ..policy import Policy

MODEL_ID = "vlm_tokenprune"
TASKS_DIR = str(Path(__file__).resolve().parent / "lmms_tasks")
"""Folder for lmms-eval's ``--include_path`` (task ``vtp_synthetic_vqa``)."""


def manifest():
    """The entry point's payload (``lmms_eval.models`` group): a ``ModelManifest``.

    ``lmms_eval.models`` is imported here, not at module level: importing it loads every entry point,
    this module included, which must then be complete (a circular import otherwise drops the plugin).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VLMTokenPrune")


def _policy_keys() -> set[str]:
    """Every key a policy string's stage can hold: stage fields, criterion and structural-op parameters."""
    from ..methods.base import CRITERIA
    from ..policy import STAGE_KEYS
    from ..structural.spec import PARAMS

    keys = set(STAGE_KEYS) | {"positions", "newlines"}
    keys |= {k for _, crit in CRITERIA.items() for k in getattr(crit, "params", {})}
    keys |= {k for params in PARAMS.values() for k in params}
    return keys


def check_model_args(unknown: dict[str, Any], policy: Any = None) -> None:
    """Refuse unknown model arguments; name the comma split when they look like the rest of a policy string."""
    if not unknown:
        return
    keys = _policy_keys()
    split = sorted(k for k, v in unknown.items() if k in keys or "+" in str(v) or ":" in str(v))
    msg = f"unknown arguments {sorted(unknown)}; see vlm_tokenprune.integrations.lmms_eval"
    if split:
        got = ",".join(f"{k}={unknown[k]}" for k in split)
        example = f"{policy},{got}" if policy is not None else got
        msg = (f"unknown arguments {sorted(unknown)}: {got} {'looks' if len(split) == 1 else 'look'} like the rest "
               f"of a policy string that lmms-eval's --model_args split on its commas (policy={policy!r} arrived "
               "without it). Write ';' between "
               f"the policy's keys (policy={example.replace(',', ';')}), quote the policy "
               f"(--model_args 'pretrained=...,policy=\"{example}\"'), or put it in a file (policy_file=policy.yaml)")
    raise InputError("model_args", msg)


def run_tag(policy: Policy | None) -> str:
    """A folder-safe name for the policy (``fastv-layer=2_keep=0.25``; ``unpruned`` without one)."""
    if policy is None:
        return "unpruned"
    text = policy.to_string()
    tag = re.sub(r"[^A-Za-z0-9._=+-]+", "_", text.replace(":", "-").replace(",", "_")).strip("_")
    if len(tag) > 100:
        tag = f"{tag[:80]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"
    return tag


_LAST_BUILT: "weakref.ref[VLMTokenPrune] | None" = None  # the wrapper lmms-eval built last (--model vlm_tokenprune)


def _install_output_folder_hook() -> None:
    """Append the run tag to lmms-eval's output folder name (``GeneralConfigTracker.model_name_sanitized``).

    Once per process; the wrapper acts only when the logged model is this plugin's (a ``VLMTokenPrune``
    object, or ``--model vlm_tokenprune``, which lmms-eval builds just before it logs the arguments)."""
    from lmms_eval.loggers.evaluation_tracker import GeneralConfigTracker

    original = GeneralConfigTracker.log_experiment_args
    if getattr(original, "_vtp_run_tag", False):
        return

    def log_experiment_args(self, *args, **kwargs):
        original(self, *args, **kwargs)
        source = kwargs.get("model_source", args[0] if args else None)
        lm = source if isinstance(source, VLMTokenPrune) else None
        if lm is None and source == MODEL_ID and _LAST_BUILT is not None:
            lm = _LAST_BUILT()
        if lm is not None:
            self.model_name_sanitized = "__".join(filter(None, [self.model_name_sanitized, lm.run_tag]))

    log_experiment_args._vtp_run_tag = True
    GeneralConfigTracker.log_experiment_args = log_experiment_args


def parse_policy_arg(policy: Any = None, policy_file: str | None = None) -> Policy | None:
    """The policy of the ``policy`` / ``policy_file`` model arguments (None when neither is given)."""
    if policy is not None and policy_file is not None:
        raise InputError("policy", "give policy or policy_file, not both")
    if policy_file is not None:
        return Policy.from_file(str(policy_file))
    if policy is None:
        return None
    if isinstance(policy, (dict, Policy)):
        return Policy.parse(policy)
    text = str(policy).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if text.startswith("{"):
        return Policy.from_json(text)
    return Policy.from_string(text.replace(";", ","))


class VLMTokenPrune(lmms):
    """lmms-eval ``simple`` model: a Hugging Face VLM with ``patch(model, policy)`` applied."""

    is_simple = True

    def __init__(self, pretrained: str = "tiny", policy: Any = None, policy_file: str | None = None, backend: str = "auto",
                 device: str | None = None, dtype: str | None = "auto", batch_size: int | str = 1,
                 attn_implementation: str | None = None, device_map: str = "", chat_template: str | None = None,
                 prompt_format: str = PLAIN_PROMPT, use_cache: bool = True, max_new_tokens: int = 1024,
                 trust_remote_code: bool = False, revision: str | None = None, model=None, processor=None, **kwargs) -> None:
        super().__init__()
        check_model_args(kwargs, policy)
        self.policy = parse_policy_arg(policy, policy_file)
        from accelerate import Accelerator

        accelerator = Accelerator()
        if accelerator.num_processes > 1 and not device_map:
            device = f"cuda:{accelerator.local_process_index}"
        self._device = resolve_device(device)
        if model is None:  # model / processor objects: for in-process use (tests, notebooks)
            extra = {"revision": revision} if revision else {}
            if device_map:
                extra["device_map"] = device_map
            model, processor = load_vlm(pretrained, dtype=dtype, attn_implementation=attn_implementation,
                                        device=self._device, trust_remote_code=trust_remote_code, **extra)
        elif processor is None:
            raise InputError("processor", "is required with a model object")
        self._model = model
        self.processor = processor
        self._tokenizer = getattr(processor, "tokenizer", processor)
        self._tokenizer.padding_side = "left"
        self.handle = patch(model, self.policy, backend=backend) if self.policy is not None else None
        self.pretrained = str(pretrained)
        self.batch_size_per_gpu = int(batch_size)
        self.chat_template = chat_template
        self.prompt_format = prompt_format
        self.use_cache = bool(use_cache)
        self.default_max_new_tokens = int(max_new_tokens)
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        self.run_tag = run_tag(self.handle.requested_policy if self.handle is not None else None)
        self._kept_sum: list[float] = []  # per token stage: visual tokens kept, summed over requests
        self._kept_labels: list[str] = []
        self._visual_in_sum = 0.0
        self._rows = 0
        self._gen_seconds = 0.0
        self._gen_tokens = 0
        global _LAST_BUILT
        _LAST_BUILT = weakref.ref(self)
        _install_output_folder_hook()

    # -- properties lmms-eval reads ----------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_token_id

    # -- what pruning did -------------------------------------------------------------------
    def _record_trace(self) -> None:
        """Add the last prefill's visual tokens (in, and kept after each token stage) to the run's sums."""
        trace = self.handle.last_trace("prefill") if self.handle is not None else None
        if trace is None or not trace.stages:
            return
        if not self._kept_labels:
            self._kept_labels = [f"stage{i}_{s.criterion}" for i, s in enumerate(trace.stages)]
            self._kept_sum = [0.0] * len(trace.stages)
        for i, s in enumerate(trace.stages):
            self._kept_sum[i] += float(sum(s.visual_after))
        self._visual_in_sum += float(sum(trace.stages[0].visual_before))
        self._rows += len(trace.stages[0].visual_after)

    def pruning_summary(self) -> dict[str, Any]:
        """The policy (as written and as run on this model) and the mean visual tokens per request so far:
        before pruning and kept after each token stage (``stage<i>_<criterion>``)."""
        h = self.handle
        n = max(self._rows, 1)
        return {
            "policy": h.requested_policy.to_string() if h is not None else None,
            "policy_on_model": h.policy.to_string() if h is not None else None,
            "requests": self._rows,
            "visual_tokens_in": self._visual_in_sum / n if self._rows else None,
            "kept_visual_tokens": {lab: k / n for lab, k in zip(self._kept_labels, self._kept_sum)} if self._rows else {},
        }

    def _log_pruning(self) -> None:
        """Report the summary through lmms-eval's ``log_metrics`` (numbers land in ``results["throughput"]``
        as ``avg_<key>``) and the log."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        summary = self.pruning_summary()
        extra: dict[str, Any] = {}
        if summary["requests"]:
            extra["vtp_visual_tokens_in"] = summary["visual_tokens_in"]
            extra.update({f"vtp_{lab}_kept_visual_tokens": v for lab, v in summary["kept_visual_tokens"].items()})
        lmms_utils.eval_logger.info(f"vlm_tokenprune: policy {summary['policy'] or 'none (unpruned)'}"
                                    + (f" (on this model: {summary['policy_on_model']})"
                                       if summary["policy_on_model"] != summary["policy"] else "")
                                    + f"; {summary['requests']} requests; mean visual tokens in "
                                    f"{summary['visual_tokens_in']}, kept per stage {summary['kept_visual_tokens']}")
        if extra or self._gen_seconds > 0:
            log_metrics(total_elapsed_time=self._gen_seconds, total_gen_tokens=self._gen_tokens,
                        avg_speed=self._gen_tokens / self._gen_seconds if self._gen_seconds > 0 else 0.0,
                        additional_metrics=extra)

    def clean(self) -> None:
        """Log what pruning did, remove the patch, then let lmms-eval drop the model (it deletes the module
        attributes). lmms-eval calls this at the end of ``evaluate()``, before it summarises the run."""
        if getattr(self, "_rows", None) is not None and (self._rows or self._gen_seconds > 0):
            self._log_pruning()
            self._rows, self._gen_seconds, self._gen_tokens = 0, 0.0, 0
        if getattr(self, "handle", None) is not None:
            self.handle.unpatch()
            self.handle = None
        super().clean()

    # -- prompts -----------------------------------------------------------------------------
    def _prompt(self, context: str, n_images: int) -> str:
        return build_prompt(self.processor, context, n_images, chat_template=self.chat_template,
                            plain_format=self.prompt_format)

    def _inputs(self, texts: list[str], images: list) -> dict:
        kw = dict(text=texts, return_tensors="pt", padding=True)
        if images:
            kw["images"] = images
        return to_device(dict(self.processor(**kw)), self._model)

    @staticmethod
    def _visuals(doc_to_visual, doc) -> list:
        v = doc_to_visual(doc) if doc_to_visual is not None else []
        v = [] if v is None else (v if isinstance(v, (list, tuple)) else [v])
        for x in v:
            if isinstance(x, str):
                raise InputError("visuals", "video / path inputs are not supported by this wrapper (PIL images only)")
        return [x.convert("RGB") for x in v]

    def _n_generated(self, row: list[int]) -> int:
        """Tokens generated in one row: up to its first end-of-text token."""
        return row.index(self.eot_token_id) if self.eot_token_id in row else len(row)

    # -- lmms API ----------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        def _collate(x):
            return -len(self._tokenizer.encode(x[0], add_special_tokens=False)), x[0]

        order = lmms_utils.Collator([r.args for r in requests], _collate, grouping=True)
        chunks = order.get_batched(n=self.batch_size, batch_fn=None)
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="vlm_tokenprune")
        res: list[str] = []
        for chunk in chunks:
            contexts, all_gen_kwargs, doc_to_visual, doc_id, task, split = zip(*chunk)
            gen_kwargs = dict(all_gen_kwargs[0])  # identical within a chunk (grouped)
            until = gen_kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            visuals = [self._visuals(doc_to_visual[i], self.task_dict[task[i]][split[i]][doc_id[i]]) for i in range(len(chunk))]
            texts = [self._prompt(c, len(v)) for c, v in zip(contexts, visuals)]
            inputs = self._inputs(texts, [im for v in visuals for im in v])
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
            gen = dict(max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.default_max_new_tokens)),
                       num_beams=int(gen_kwargs.get("num_beams", 1) or 1), do_sample=do_sample,
                       use_cache=self.use_cache, pad_token_id=self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self.eot_token_id,
                       eos_token_id=self.eot_token_id)
            if do_sample:
                gen.update(temperature=temperature, top_p=gen_kwargs.get("top_p"))
            start = time.perf_counter()
            with torch.no_grad():
                out = self._model.generate(**inputs, **gen)
            self._gen_seconds += time.perf_counter() - start
            self._record_trace()
            new = out[:, inputs["input_ids"].shape[1]:]
            self._gen_tokens += sum(self._n_generated(row) for row in new.tolist())
            for text_out, ctx in zip(self._tokenizer.batch_decode(new, skip_special_tokens=True), contexts):
                for stop in until:
                    if stop:
                        text_out = text_out.split(stop)[0]
                text_out = text_out.strip()
                res.append(text_out)
                self.cache_hook.add_partial("generate_until", (ctx, all_gen_kwargs[0]), text_out)
                pbar.update(1)
        pbar.close()
        return order.get_original(res)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation (one request at a time). A patched forward returns logits for
        the kept tokens only; every text token is kept and in order, so the last positions still predict the
        continuation."""
        res = []
        for context, continuation, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            if not isinstance(continuation, str):
                continuation = continuation(self.task_dict[task][split][doc_id])
            images = self._visuals(doc_to_visual, self.task_dict[task][split][doc_id])
            prompt = self._prompt(context, len(images))
            full = self._inputs([prompt + continuation], images)
            n_prompt = int(self._inputs([prompt], images)["input_ids"].shape[1])
            n_cont = full["input_ids"].shape[1] - n_prompt
            if n_cont < 1:
                raise InputError("continuation", f"{continuation!r} adds no token to the prompt")
            with torch.no_grad():
                logits = self._model(**full).logits[0, -n_cont - 1:-1].float()
            self._record_trace()
            target = full["input_ids"][0, -n_cont:]
            logp = torch.log_softmax(logits, -1)
            res.append((float(logp.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())))
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vlm_tokenprune's lmms-eval wrapper does not implement multi-round generation")


__all__ = ["VLMTokenPrune", "manifest", "parse_policy_arg", "TASKS_DIR", "MODEL_ID"]

if __name__ == "__main__":  # pragma: no cover
    print(json.dumps({"model_id": MODEL_ID, "include_path": TASKS_DIR}))
