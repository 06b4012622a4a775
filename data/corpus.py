"""Text corpora, tokenised into fixed-length context windows, deterministic given the seed.

Windows are packed the way Pythia was trained: documents are concatenated with an end-of-text token between
them and cut into windows of ``context_length`` tokens, so no token is padding. Each window records the
document it starts in and the token position there, so analysis can show the source text.

The offline default (``source: stdlib``) is the Python standard library of the running interpreter: about
12 MB of real text that every machine already has, read through ``datasets``' local ``text`` loader.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np


class Window(NamedTuple):
    doc: int  # index of the document the window starts in
    start: int  # token position of the window's first token in that document
    tokens: np.ndarray  # [T] int32 token ids


def stdlib_files(split: str) -> list[Path]:
    """The standard library's .py files (without its test suites: ~12 MB), sorted; a hash of the path puts
    ~5% of the files into "validation"."""
    if split not in ("train", "validation", "all"):
        raise ValueError(f"corpus.split: '{split}' is not one of ('train', 'validation', 'all')")
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    found = []
    for folder, subfolders, names in os.walk(root):  # not into skipped folders at all (rglob walked them: ~1 s)
        subfolders[:] = [d for d in subfolders if d not in skip]
        found += [Path(folder) / n for n in names if n.endswith(".py")]
    files = sorted(p for p in found if p.is_file())
    if split == "all":
        return files
    held_out = lambda p: int(hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest(), 16) % 20 == 0
    return [p for p in files if held_out(p) == (split == "validation")]


def heldout_documents(every: int, held_out: bool) -> Callable[[int], bool]:
    """Document filter: every ``every``-th document of the corpus's (seeded, shuffled) order is held out.

    ``held_out=True`` selects those, ``False`` the rest. The order is already a seeded shuffle, so the held-out
    documents are a random sample, and the rule needs no look-ahead in a streamed corpus."""
    if every < 2:
        raise ValueError(f"data.heldout_every: {every} must be >= 2 (one document in `every` is held out)")
    return lambda doc: (doc % every == every - 1) == held_out


class TextCorpus:
    def __init__(self, source: str = "stdlib", name: str | None = None, split: str = "train",
                 text_column: str = "text", streaming: bool = True, shuffle_buffer: int = 10_000,
                 seed: int = 0, max_docs: int | None = None, cache_dir: str | None = None):
        self.source, self.name, self.split, self.text_column = source, name, split, text_column
        self.streaming, self.shuffle_buffer, self.seed = streaming, shuffle_buffer, seed
        self.max_docs, self.cache_dir = max_docs, cache_dir

    def config(self) -> dict:
        """What determines the text; part of the activation cache's key."""
        return dict(source=self.source, name=self.name, split=self.split, text_column=self.text_column,
                    seed=self.seed, max_docs=self.max_docs, shuffle_buffer=self.shuffle_buffer)

    def _dataset(self):
        import datasets
        if self.source == "stdlib":
            files = [str(p) for p in stdlib_files(self.split)]
            ds = datasets.load_dataset("text", data_files={"train": files}, sample_by="document", split="train",
                                       encoding_errors="replace", cache_dir=self.cache_dir)
            # a seeded order mixes modules from all packages into every part of the corpus
            return ds.shuffle(seed=self.seed)
        ds = datasets.load_dataset(self.source, self.name, split=self.split, streaming=self.streaming,
                                   cache_dir=self.cache_dir)
        return ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer) if self.streaming else ds.shuffle(seed=self.seed)

    def texts(self) -> Iterator[tuple[int, str]]:
        """(document index, text) in the corpus's deterministic order."""
        for i, row in enumerate(self._dataset()):
            if self.max_docs is not None and i >= self.max_docs:
                return
            if self.text_column not in row:
                raise KeyError(f"corpus.text_column: '{self.text_column}' is not a column of {self.source} "
                               f"(columns: {sorted(row)})")
            yield i, row[self.text_column]

    def windows(self, tokenizer, context_length: int, max_tokens: int | None = None,
                documents: Callable[[int], bool] | None = None) -> Iterator[Window]:
        """Pack documents (separated by the tokenizer's EOS token) into windows of ``context_length``.

        ``documents(doc)`` picks the documents packed (e.g. ``heldout_documents``): a document is either wholly
        in the windows or not at all, so a split made this way never shares a document."""
        eos = tokenizer.eos_token_id
        pending: deque[list] = deque()  # [doc, next position, ids] of documents not yet fully windowed
        size = emitted = 0
        for doc, text in self.texts():
            if documents is not None and not documents(doc):
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = np.asarray(ids + [eos] if eos is not None else ids, dtype=np.int32)
            pending.append([doc, 0, ids])
            size += len(ids)
            while size >= context_length:
                first_doc, start = pending[0][0], pending[0][1]
                parts, need = [], context_length
                while need:
                    segment = pending[0]
                    take = min(need, len(segment[2]) - segment[1])
                    parts.append(segment[2][segment[1]:segment[1] + take])
                    segment[1] += take
                    need -= take
                    if segment[1] == len(segment[2]):
                        pending.popleft()
                size -= context_length
                yield Window(doc=first_doc, start=start, tokens=np.concatenate(parts))
                emitted += context_length
                if max_tokens is not None and emitted >= max_tokens:
                    return
