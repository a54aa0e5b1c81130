"""Helpers of the ``vtp_synthetic_vqa`` lmms-eval task (loaded by lmms-eval through ``!function utils.NAME``)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lmms_eval.api.task import ConfigurableTask

QTYPES = ("color", "location", "exists", "count", "read")


def data_root() -> Path:
    return Path(os.environ.get("VTP_DATA_DIR") or Path.home() / ".cache" / "vlm_tokenprune")


def ensure_dataset(name: str, n_docs: int) -> Path:
    """The ``save_to_disk`` folder of the first ``n_docs`` synthetic test examples, written on first use.

    The folder name carries a fingerprint of the examples (questions, answers and pixels), so a changed
    generator never reuses stale data; the folder is written to a temporary name and renamed when complete.
    """
    import datasets
    import numpy as np

    from vlm_tokenprune.eval.synthetic import make_split

    examples = make_split("test", n_docs)
    h = hashlib.sha1()
    for e in examples:
        h.update(f"{e['seed']}|{e['qtype']}|{e['question']}|{e['answer']}|".encode())
        h.update(np.asarray(e["image"]).tobytes())
    path = data_root() / f"{name}_{n_docs}_{h.hexdigest()[:12]}"
    if (path / "dataset_dict.json").exists():
        return path
    features = datasets.Features({
        "index": datasets.Value("int64"), "seed": datasets.Value("int64"), "qtype": datasets.Value("string"),
        "question": datasets.Value("string"), "answer": datasets.Value("string"), "image": datasets.Image(),
    })
    rows = [{"index": i, "seed": e["seed"], "qtype": e["qtype"], "question": e["question"], "answer": e["answer"],
             "image": e["image"]} for i, e in enumerate(examples)]
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows, features=features)})
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    dd.save_to_disk(str(tmp))
    try:
        tmp.rename(path)
    except OSError:  # another process finished first
        if not (path / "dataset_dict.json").exists():
            raise
    return path


class SyntheticVQATask(ConfigurableTask):
    """A ``load_from_disk`` task whose folder is generated from the package on first use."""

    def __init__(self, *args, config=None, **kwargs):
        if config is not None:
            config = dict(config)
            config.pop("class", None)
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs=None) -> None:
        kw = dict(dataset_kwargs or {})
        n_docs = int(kw.pop("n_docs", 500))
        self.DATASET_PATH = str(ensure_dataset(str(self.config.dataset_path), n_docs))
        kw["load_from_disk"] = True
        super().download(kw)


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    hit = int(results[0].strip() == doc["answer"])
    out = {"exact_match": hit}
    for q in QTYPES:
        out[f"{q}_accuracy"] = {"qtype": doc["qtype"], "hit": hit}
    return out


def _aggregate(qtype):
    def agg(items):
        hits = [x["hit"] for x in items if x["qtype"] == qtype]
        return sum(hits) / len(hits) if hits else float("nan")
    agg.__name__ = f"aggregate_{qtype}"
    return agg


aggregate_color = _aggregate("color")
aggregate_location = _aggregate("location")
aggregate_exists = _aggregate("exists")
aggregate_count = _aggregate("count")
aggregate_read = _aggregate("read")
