"""Build the offline lm-evaluation-harness tasks from the bundled held-out text.

    python eval/tasks/build_tasks.py          # rewrites eval/tasks/*.jsonl (deterministic)

Source: ``sparsellm/resources/heldout.txt`` (the 2010-2012 State of the Union addresses, public
domain), cut into sentences at ``. ! ?`` followed by white space. Two tasks:

* ``sotu_lastword.jsonl`` (LAMBADA-style): a passage of whole sentences (at least
  ``LASTWORD_MIN_CONTEXT`` words) whose last word is to be predicted. As in LAMBADA, the word
  must be recoverable from the passage: it is alphabetic, at least 4 letters, and occurs
  earlier in the passage. ``{"context": passage without its last word, "target": the word}``;
  the punctuation after the word is dropped.
* ``sotu_continuation.jsonl`` (multiple choice, like HellaSwag / StoryCloze): three
  consecutive sentences, then the true next sentence among four choices; the three
  distractors are sentences from at least ``FAR`` sentences away, of a similar length (so
  length alone does not give the answer away), drawn with a fixed seed.
  ``{"context", "choices": [4 sentences], "label": index of the true one}``. Chance: 25%.

Same text in, same files out (``random.Random(SEED)``, no other source of randomness).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "sparsellm" / "resources" / "heldout.txt"
SEED = 1234
LASTWORD_MIN_CONTEXT = 100  # words of passage before the target
LASTWORD_MAX_ITEMS = 400
CONTINUATION_CONTEXT = 3  # sentences before the one to choose
CONTINUATION_MAX_ITEMS = 300
FAR = 20  # distractors come from at least this many sentences away
CHOICES = 4


def sentences(text: str) -> list[str]:
    """The text's sentences, white space collapsed."""
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if p]


def last_word_items(sents: list[str]) -> list[dict]:
    """Passages ending at each sentence whose last word occurs earlier in the passage."""
    items = []
    for end, sentence in enumerate(sents):
        match = re.fullmatch(r"(.*\S)\s+([A-Za-z]{4,})[.!?\"']*", sentence)
        if not match:
            continue
        head, word = match.groups()
        start = end
        while start > 0 and len(" ".join(sents[start:end]).split()) < LASTWORD_MIN_CONTEXT:
            start -= 1
        context = " ".join([*sents[start:end], head])
        if len(context.split()) < LASTWORD_MIN_CONTEXT:
            continue
        if re.search(rf"\b{word}\b", context):
            items.append({"context": context, "target": word})
    return items[:LASTWORD_MAX_ITEMS]


def _similar_length(sents: list[str], index: int, near: range) -> list[int]:
    """Sentences outside ``near`` within 30% of sentence ``index``'s word count."""
    words = len(sents[index].split())
    return [
        i
        for i, s in enumerate(sents)
        if i not in near and abs(len(s.split()) - words) <= max(2, 0.3 * words)
    ]


def continuation_items(sents: list[str], rng: random.Random) -> list[dict]:
    """Three sentences, then the true next one among ``CHOICES`` of similar length."""
    items = []
    step = CONTINUATION_CONTEXT + 1  # items do not share sentences
    for gold in range(CONTINUATION_CONTEXT, len(sents), step):
        if not 6 <= len(sents[gold].split()) <= 40:
            continue
        pool = _similar_length(sents, gold, range(gold - FAR, gold + FAR + 1))
        distractors = {sents[i] for i in pool} - {sents[gold]}
        if len(distractors) < CHOICES - 1:
            continue
        choices = [sents[gold], *rng.sample(sorted(distractors), CHOICES - 1)]
        rng.shuffle(choices)
        context = " ".join(sents[gold - CONTINUATION_CONTEXT : gold])
        items.append({"context": context, "choices": choices, "label": choices.index(sents[gold])})
    return items[:CONTINUATION_MAX_ITEMS]


def write_jsonl(path: Path, items: list[dict]) -> None:
    lines = (json.dumps(item, ensure_ascii=False, sort_keys=True) for item in items)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{path.name}: {len(items)} items, {path.stat().st_size / 1024:.0f} KiB")


def main() -> None:
    sents = sentences(SOURCE.read_text(encoding="utf-8"))
    write_jsonl(HERE / "sotu_lastword.jsonl", last_word_items(sents))
    write_jsonl(HERE / "sotu_continuation.jsonl", continuation_items(sents, random.Random(SEED)))


if __name__ == "__main__":
    main()
