"""A search's own data: a JSONL file of ``{"image", "prompt", "answer"}`` records (``--calibration-data`` /
``--heldout-data``), read and checked before any model is loaded.

One record per line (blank lines are skipped)::

    {"image": "imgs/cat.png", "prompt": "USER: <image>\\nWhat animal is this? ASSISTANT:", "answer": "cat"}

``image``: a path relative to the file's folder (or absolute), or a non-empty list of them (one per image
placeholder of the prompt); ``prompt``: the full prompt text as the model's processor expects it, image
placeholders included; ``answer``: the reference continuation (optional for calibration, required for
held-out data). Any other key is refused, so a typo (``"answers"``) does not silently drop the answers.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from ..errors import InputError

KEYS = ("image", "prompt", "answer")


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line of the file
    images: tuple[str, ...]  # absolute paths
    prompt: str
    answer: str | None

    @property
    def identity(self) -> tuple:
        """What makes two records the same example: the same image files (real paths) and prompt."""
        return (tuple(os.path.realpath(p) for p in self.images), self.prompt)


def normalise_answer(text: str) -> str:
    """Exact-match normalisation: surrounding white space stripped, lower-cased (the tiny VLM's ``eval.tiny_vlm.answer``
    strips and its tokenizer lower-cases; here both sides are normalised explicitly, whatever the tokenizer)."""
    return text.strip().lower()


def read_records(path: "str | os.PathLike", name: str = "calibration_data", *, require_answer: bool = False) -> list[Record]:
    """Every record of the JSONL file ``path``, checked: an ``InputError`` whose field names the option, the line and
    the key (``calibration_data[line 3].image``) and whose message says what is allowed. Images are opened (header
    only) so a missing or unreadable image is refused here, not in the middle of a search."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(name, f"{path!r} is not a file; expected a JSONL file of {{\"image\", \"prompt\", \"answer\"}} records")
    folder = os.path.dirname(os.path.abspath(path))
    records: list[Record] = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise InputError(name, f"{path!r} is not UTF-8 text ({e})") from None
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{name}[line {n}]"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(where, f"is not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object "
                             "with keys image, prompt and optionally answer") from None
        if not isinstance(obj, dict):
            raise InputError(where, f"is a JSON {type(obj).__name__}, not an object with keys image, prompt, answer")
        extra = sorted(set(obj) - set(KEYS))
        if extra:
            raise InputError(f"{where}.{extra[0]}", f"unknown key; allowed: {', '.join(KEYS)}")
        for key in ("image", "prompt") + (("answer",) if require_answer else ()):
            if key not in obj:
                need = "held-out records need an answer to score" if key == "answer" else "required"
                raise InputError(f"{where}.{key}", f"missing ({need}); allowed keys: {', '.join(KEYS)}")
        image = obj["image"]
        paths = [image] if isinstance(image, str) else image
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise InputError(f"{where}.image", f"{image!r}; allowed: an image path (relative to the file's folder) or a "
                             "non-empty list of them")
        full = []
        for p in paths:
            fp = p if os.path.isabs(p) else os.path.join(folder, p)
            if not os.path.isfile(fp):
                raise InputError(f"{where}.image", f"{p!r} is not a file (paths are relative to {folder!r})")
            try:
                with Image.open(fp) as im:
                    im.verify()
            except (OSError, UnidentifiedImageError, SyntaxError) as e:
                raise InputError(f"{where}.image", f"{p!r} is not a readable image ({e})") from None
            full.append(os.path.abspath(fp))
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}.prompt", f"{prompt!r}; allowed: a non-empty string (the full prompt, image "
                             "placeholders included)")
        answer = obj.get("answer")
        if answer is not None and (not isinstance(answer, str) or not answer.strip()):
            raise InputError(f"{where}.answer", f"{answer!r}; allowed: a non-empty string, or leave the key out "
                             "(calibration only: the unpruned model's greedy continuation is the target)")
        records.append(Record(n, tuple(full), prompt, answer))
    if not records:
        raise InputError(name, f"{path!r} holds no records")
    return records


def check_disjoint(calibration: list[Record], heldout: list[Record], names: tuple[str, str] = ("calibration_data",
                                                                                                   "heldout_data")) -> None:
    """Refuse a held-out record that is also a calibration record (same images and prompt): the search must not
    be judged on the examples it was fitted to."""
    seen = {r.identity: r.line for r in calibration}
    for r in heldout:
        if r.identity in seen:
            raise InputError(f"{names[1]}[line {r.line}]", f"is the same example (images and prompt) as {names[0]} "
                             f"line {seen[r.identity]}; the held-out data must be disjoint from the calibration data")


def digest(records: list[Record]) -> str:
    """A short hash of the records (a resumed search must run on the same data)."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.identity, r.answer]).encode())
    return h.hexdigest()[:16]
