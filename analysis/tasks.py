"""Tasks for attribution: pairs of clean and corrupted prompts whose answers differ, and a logit-difference metric.

Every task yields prompts in pairs of equal length that differ only where the task changes them, so a
position in the clean prompt has a counterpart in the corrupted one (attribution patching compares the
two position by position). Prompts start with the tokenizer's BOS/EOS token, as Pythia's packed training
windows do after a document boundary, and are right-padded with it: the model is causal, so the padding
after a prompt's answer position cannot change anything at or before it.

The metric of every task is a logit difference at the answer position,
    logit[answer] - logit[wrong],
where ``answer`` is what the clean prompt calls for and ``wrong`` what the corrupted prompt calls for.
A model that does the task scores > 0 on clean prompts and < 0 on corrupted ones.

    induction  repeated random tokens (any model, mini-Pythia included): [bos] r_1..r_L r_1..r_{L-1}
               -> r_L; corrupted: the first r_L replaced by another token r', which it then calls for.
    ioi        indirect-object identification (Wang et al. 2022): "When Mary and John went to the store,
               John gave a drink to" -> " Mary"; corrupted: the second subject is the other name.
    sva        subject-verb agreement: "The author near the cabinets" -> " is" (" are" for "authors");
               corrupted: the subject's number flipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch


class TaskPrompts(NamedTuple):
    clean: torch.Tensor  # [N, T] token ids
    corrupted: torch.Tensor  # [N, T] token ids, equal to clean except where the task changes the prompt
    answer: torch.Tensor  # [N] the token the clean prompt calls for
    wrong: torch.Tensor  # [N] the token the corrupted prompt calls for
    position: torch.Tensor  # [N] the position whose next-token logits are read
    examples: list[tuple[str, str, str, str]]  # a few (clean, corrupted, answer, wrong) as text, for the report


def take(prompts: TaskPrompts, rows) -> TaskPrompts:
    """The prompt pairs at ``rows`` (indices), as a TaskPrompts of their own (examples kept as they are)."""
    idx = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    return TaskPrompts(prompts.clean[idx], prompts.corrupted[idx], prompts.answer[idx], prompts.wrong[idx],
                       prompts.position[idx], prompts.examples)


def split_prompts(prompts: TaskPrompts, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(selection, test): sorted indices of two disjoint sets of prompt pairs, the first about ``fraction`` of
    them, drawn at random (``seed``). Pairs that share their clean or their corrupted prompt always go to the
    same set, so no prompt is in both, even when a template task repeats one."""
    N = len(prompts.clean)
    parent = list(range(N))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for ids in (prompts.clean, prompts.corrupted):
        first: dict[bytes, int] = {}
        for i, row in enumerate(ids.numpy()):
            j = first.setdefault(row.tobytes(), i)
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(N):
        groups.setdefault(root(i), []).append(i)
    if len(groups) < 2:
        raise ValueError(f"attribution: {N} prompt pair(s) with {len(groups)} distinct prompt(s) cannot be split "
                         "into a selection and a test half; use more prompts")
    order = [groups[g] for g in np.random.default_rng(seed).permutation(sorted(groups))]
    want = min(max(round(fraction * N), 1), N - 1)
    selection: list[int] = []
    for members in order[:-1]:  # the last group always goes to the test set, so neither set is empty
        if len(selection) >= want:
            break
        selection += members
    test = sorted(set(range(N)) - set(selection))
    return np.array(sorted(selection), dtype=np.int64), np.array(test, dtype=np.int64)


def answer_mask(prompts: TaskPrompts, T: int, drop_first: int) -> torch.Tensor:
    """[N, T] bool over the positions from drop_first on: True up to and including each prompt's answer
    position, False on the right padding after it (which a causal model cannot use for the answer)."""
    t = torch.arange(T) + drop_first
    return t[None, :] <= prompts.position[:, None]


def logit_diff(logits: torch.Tensor, prompts: TaskPrompts, rows: slice = slice(None)) -> torch.Tensor:
    """[n] logit[answer] - logit[wrong] at each prompt's answer position; logits [n, T, V] for ``rows``."""
    n = torch.arange(logits.shape[0], device=logits.device)
    at = logits[n, prompts.position[rows].to(logits.device)]  # [n, V]
    return (at.gather(-1, prompts.answer[rows, None].to(logits.device))
            - at.gather(-1, prompts.wrong[rows, None].to(logits.device)))[:, 0]


def _bos(tokenizer) -> int:
    for tok in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tok is not None:
            return int(tok)
    raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: has neither a BOS nor an EOS token")


def _stack(pairs: list[tuple[list[int], list[int], int, int]], bos: int, tokenizer) -> TaskPrompts:
    """(clean ids, corrupted ids, answer, wrong) per prompt -> right-padded tensors."""
    T = max(len(c) for c, _, _, _ in pairs)
    clean = torch.full((len(pairs), T), bos, dtype=torch.long)
    corrupted = clean.clone()
    for i, (c, r, _, _) in enumerate(pairs):
        if len(c) != len(r):
            raise AssertionError(f"prompt {i}: clean has {len(c)} tokens, corrupted {len(r)}")
        clean[i, :len(c)] = torch.tensor(c)
        corrupted[i, :len(r)] = torch.tensor(r)
    position = torch.tensor([len(c) - 1 for c, _, _, _ in pairs])
    answer = torch.tensor([a for _, _, a, _ in pairs])
    wrong = torch.tensor([w for _, _, _, w in pairs])
    examples = [(tokenizer.decode(c[1:]), tokenizer.decode(r[1:]), tokenizer.decode([a]), tokenizer.decode([w]))
                for c, r, a, w in pairs[:4]]
    return TaskPrompts(clean, corrupted, answer, wrong, position, examples)


def ordinary_tokens(tokenizer) -> list[int]:
    """Ids of the tokens that are text: not special, not a byte fragment (which decodes to U+FFFD), printable
    and not only white space; random sequences of them read like text to the model and in the report."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    return [i for i, text in zip(ids, tokenizer.batch_decode([[i] for i in ids]))
            if "\ufffd" not in text and text.strip() and text.isprintable()]


def _single_token(tokenizer, word: str) -> int | None:
    ids = tokenizer.encode(word, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


@dataclass
class Induction:
    """A passage and its repeat: the second copy is predictable only by looking back at the first.

    source "random": the passage is random text tokens (the classic test, which no n-gram statistics can pass);
    "text": held-out passages of ``corpus`` (copying real text, as duplicated passages in training data ask for).
    """

    n_prompts: int = 64  # prompt pairs
    seq_len: int = 16  # tokens in the first copy (L); the prompt is 2L tokens with the BOS
    seed: int = 0  # which random tokens / passages
    source: str = "random"  # random | text
    corpus: Any = None  # source "text": a data.corpus.TextCorpus (its held-out split)

    metric = ("logit of the token that followed the repeated prefix in the first copy minus the logit of the "
              "token that followed it in the corrupted first copy, at the last position")

    @property
    def name(self) -> str:
        return "induction" if self.source == "random" else f"induction_{self.source}"

    def prompts(self, tokenizer) -> TaskPrompts:
        if self.seq_len < 2:
            raise ValueError(f"attribution.task.seq_len: {self.seq_len} must be >= 2")
        if self.source not in ("random", "text"):
            raise ValueError(f"attribution.task.source: '{self.source}' is not one of ('random', 'text')")
        bos = _bos(tokenizer)
        ordinary = ordinary_tokens(tokenizer)
        pool = np.array(ordinary)
        if len(pool) < self.seq_len + 1:
            raise ValueError(f"attribution.task.seq_len: {self.seq_len} needs more than the {len(pool)} ordinary "
                             "tokens of the vocabulary")
        rng = np.random.default_rng(self.seed)
        passages = self._passages(tokenizer, set(ordinary), rng) if self.source == "text" else None
        pairs = []
        for i in range(self.n_prompts):
            if passages is None:
                *r, alt = rng.choice(pool, self.seq_len + 1, replace=False).tolist()  # distinct: one right answer
            else:
                r = passages[i]
                alt = int(rng.choice(pool[~np.isin(pool, r)]))
            clean = [bos] + r + r[:-1]
            corrupted = [bos] + r[:-1] + [alt] + r[:-1]
            pairs.append((clean, corrupted, r[-1], alt))
        return _stack(pairs, bos, tokenizer)

    def _passages(self, tokenizer, ordinary: set[int], rng: np.random.Generator) -> list[list[int]]:
        """n_prompts passages of seq_len tokens from the corpus, drawn among the first 8 x n_prompts windows
        that hold only ordinary tokens and whose last token occurs once (so the answer is unambiguous)."""
        if self.corpus is None:
            raise ValueError("attribution.task.corpus: source 'text' needs a corpus (a data.corpus.TextCorpus)")
        found = []
        for w in self.corpus.windows(tokenizer, self.seq_len):
            r = [int(t) for t in w.tokens]
            if all(t in ordinary for t in r) and r.count(r[-1]) == 1:
                found.append(r)
                if len(found) == 8 * self.n_prompts:
                    break
        if len(found) < self.n_prompts:
            raise ValueError(f"attribution.task.corpus: only {len(found)} usable passages of {self.seq_len} tokens; "
                             f"{self.n_prompts} are needed")
        return [found[i] for i in rng.choice(len(found), self.n_prompts, replace=False)]


NAMES = ["Mary", "John", "Alice", "Bob", "James", "Michael", "David", "Sarah", "Emma", "Anna", "Paul", "Mark",
         "Peter", "Laura", "Lisa", "Tom", "Kevin", "Jessica", "Daniel", "Rachel", "Steven", "Karen", "Brian",
         "Amy", "Jason", "Eric", "Susan", "Richard", "Linda", "Robert", "Thomas", "George", "Helen", "Frank",
         "Jack", "Kate", "Adam", "Emily", "Ben", "Sam"]
PLACES = ["store", "park", "school", "office", "station", "market", "garden", "hospital", "restaurant", "beach"]
OBJECTS = ["drink", "book", "ring", "bag", "letter", "ball", "gift", "key", "phone", "flower"]
IOI_TEMPLATES = [
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "Then, {A} and {B} went to the {place}. {S} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
    "Friends {A} and {B} found a {object} at the {place}. {S} gave it to",
]


@dataclass
class IOI:
    """Indirect-object identification: the name that is not repeated receives the object."""

    n_prompts: int = 64  # prompt pairs
    seed: int = 0  # which templates, names, places and objects

    name = "ioi"
    metric = "logit of the indirect object's name minus the logit of the subject's name, at the last position"

    def prompts(self, tokenizer) -> TaskPrompts:
        bos = _bos(tokenizer)
        names = [(n, t) for n in NAMES if (t := _single_token(tokenizer, " " + n)) is not None]
        if len(names) < 4:
            raise ValueError(f"attribution task 'ioi': only {len(names)} of the {len(NAMES)} names are single "
                             f"tokens for the tokenizer of {getattr(tokenizer, 'name_or_path', '?')}; the task "
                             "needs an English model such as Pythia")
        rng = np.random.default_rng(self.seed)
        pairs = []
        for _ in range(self.n_prompts):
            template = IOI_TEMPLATES[rng.integers(len(IOI_TEMPLATES))]
            (a, ta), (b, tb) = (names[i] for i in rng.choice(len(names), 2, replace=False))
            fill = dict(A=a, B=b, place=rng.choice(PLACES), object=rng.choice(OBJECTS))
            if rng.random() < 0.5:  # the indirect object named first or second, equally often
                fill["A"], fill["B"], ta, tb = b, a, tb, ta
            clean = tokenizer.encode(template.format(**fill, S=fill["B"]), add_special_tokens=False)
            corrupted = tokenizer.encode(template.format(**fill, S=fill["A"]), add_special_tokens=False)
            if len(clean) != len(corrupted):  # a name may merge with the punctuation after it
                continue
            pairs.append(([bos] + clean, [bos] + corrupted, ta, tb))
        if not pairs:
            raise ValueError("attribution task 'ioi': no template tokenises to equal-length clean and corrupted prompts")
        return _stack(pairs, bos, tokenizer)


NOUNS = [("author", "authors"), ("teacher", "teachers"), ("doctor", "doctors"), ("pilot", "pilots"),
         ("farmer", "farmers"), ("student", "students"), ("boy", "boys"), ("girl", "girls"), ("dog", "dogs"),
         ("key", "keys"), ("car", "cars"), ("friend", "friends"), ("player", "players"), ("writer", "writers"),
         ("officer", "officers"), ("manager", "managers"), ("singer", "singers"), ("painter", "painters")]
ATTRACTORS = ["cabinet", "door", "house", "tree", "window", "table", "river", "garden", "building", "road"]
SVA_TEMPLATES = ["The {subject} near the {attractor}", "The {subject} behind the {attractor}",
                 "The {subject} next to the {attractor}", "The {subject} by the {attractor}",
                 "The {subject} with the {attractor}"]
VERBS = [(" is", " are"), (" was", " were"), (" has", " have")]


@dataclass
class SVA:
    """Subject-verb agreement across a prepositional phrase whose noun may have the other number."""

    n_prompts: int = 64  # prompt pairs
    seed: int = 0  # which templates, nouns and verbs

    name = "sva"
    metric = "logit of the verb form that agrees with the subject minus the logit of the other form"

    def prompts(self, tokenizer) -> TaskPrompts:
        bos = _bos(tokenizer)
        verbs = [(s, p, ts, tp) for s, p in VERBS
                 if (ts := _single_token(tokenizer, s)) is not None and (tp := _single_token(tokenizer, p)) is not None]
        nouns = [(s, p) for s, p in NOUNS if len(tokenizer.encode(" " + s, add_special_tokens=False))
                 == len(tokenizer.encode(" " + p, add_special_tokens=False))]
        if not verbs or len(nouns) < 2:
            raise ValueError(f"attribution task 'sva': {len(verbs)} verb pairs are single tokens and {len(nouns)} "
                             f"noun pairs tokenise to equal lengths for the tokenizer of "
                             f"{getattr(tokenizer, 'name_or_path', '?')}; the task needs an English model such as Pythia")
        rng = np.random.default_rng(self.seed)
        pairs = []
        for _ in range(self.n_prompts):
            template = SVA_TEMPLATES[rng.integers(len(SVA_TEMPLATES))]
            singular, plural = nouns[rng.integers(len(nouns))]
            attractor = ATTRACTORS[rng.integers(len(ATTRACTORS))] + ("s" if rng.random() < 0.5 else "")
            _, _, t_sing, t_plur = verbs[rng.integers(len(verbs))]
            sing = tokenizer.encode(template.format(subject=singular, attractor=attractor), add_special_tokens=False)
            plur = tokenizer.encode(template.format(subject=plural, attractor=attractor), add_special_tokens=False)
            if len(sing) != len(plur):
                continue
            if rng.random() < 0.5:  # singular and plural subjects equally often on the clean side
                pairs.append(([bos] + sing, [bos] + plur, t_sing, t_plur))
            else:
                pairs.append(([bos] + plur, [bos] + sing, t_plur, t_sing))
        if not pairs:
            raise ValueError("attribution task 'sva': no template tokenises to equal-length clean and corrupted prompts")
        return _stack(pairs, bos, tokenizer)
