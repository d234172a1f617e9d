"""Generated long-range retrieval tasks: the default calibration data, made here, so nothing is downloaded.

A context of generated filler hides one or more facts ("The pass key of Ada is 48213.") at chosen depths; the
continuation, fed after the context is compressed, asks for one of them and answers it. The answer's digits are
the scored tokens. Variants: one key, several keys (ask for one), one name with several values (ask for all).
"""

from __future__ import annotations

import dataclasses
import random

import torch

from .scoring import Example

NAMES = [
    "Ada", "Basil", "Clara", "Dorian", "Edith", "Felix", "Greta", "Hugo", "Iris", "Jonas", "Kira", "Lionel",
    "Mira", "Nestor", "Olga", "Pavel", "Quinn", "Rosa", "Silas", "Tilda", "Ulric", "Vera", "Walter", "Yara",
]  # fmt: skip
ADJECTIVES = [
    "quiet", "golden", "narrow", "distant", "ancient", "bright", "heavy", "gentle", "crooked", "silver", "hollow",
    "steady", "pale", "restless", "wooden", "humble", "broad", "sudden", "weary", "curious",
]  # fmt: skip
NOUNS = [
    "river", "lantern", "orchard", "harbour", "meadow", "bridge", "tower", "garden", "valley", "market", "chapel",
    "forest", "mill", "library", "road", "island", "kitchen", "window", "stable", "hill",
]  # fmt: skip
VERBS = [
    "watched", "crossed", "followed", "remembered", "passed", "painted", "described", "visited", "guarded",
    "admired", "circled", "left", "reached", "measured", "named",
]  # fmt: skip
SUBJECTS = ["The traveller", "An old farmer", "The clerk", "A young painter", "The captain", "Her cousin", "The monk"]

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
VARIANTS = ("single", "multikey", "multivalue")


def _sentence(rng: random.Random) -> str:
    return (
        f" {rng.choice(SUBJECTS)} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        f" by the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}."
    )


def _key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def make_task(tok, context: int, continuation: int, variant: str, depth: float, seed: int) -> Example:
    """One retrieval example with exactly `context` + `continuation` tokens."""
    rng = random.Random(seed)
    names = rng.sample(NAMES, 4)
    target = names[0]
    if variant == "single":
        facts = [(depth, f" The pass key of {target} is {(answer := _key(rng))}. Remember it.")]
        question = f"\nQuestion: What is the pass key of {target}?\nAnswer: The pass key of {target} is"
        answer_text = f" {answer}."
    elif variant == "multikey":
        facts = [(depth, f" The pass key of {target} is {(answer := _key(rng))}. Remember it.")]
        others = [d for d in DEPTHS if abs(d - depth) > 0.05]
        for name, d in zip(names[1:], rng.sample(others, 3), strict=True):
            facts.append((d, f" The pass key of {name} is {_key(rng)}. Remember it."))
        question = f"\nQuestion: What is the pass key of {target}?\nAnswer: The pass key of {target} is"
        answer_text = f" {answer}."
    elif variant == "multivalue":
        first, second = _key(rng), _key(rng)
        later = min(0.95, depth + 0.3) if depth < 0.6 else depth
        earlier = depth if depth < 0.6 else max(0.05, depth - 0.4)
        facts = [
            (earlier, f" The first code of {target} is {first}. Remember it."),
            (later, f" The second code of {target} is {second}. Remember it."),
        ]
        question = f"\nQuestion: What are the two codes of {target}?\nAnswer: The two codes of {target} are"
        answer_text = f" {first} and {second}."
    else:
        raise ValueError(f"unknown task variant {variant!r}; use one of {VARIANTS}")

    fact_ids = sorted(((d, _ids(tok, text)) for d, text in facts), key=lambda x: x[0])
    room = context - sum(len(f) for _, f in fact_ids)
    filler: list[int] = []
    while len(filler) < room:
        filler += _ids(tok, _sentence(rng))
    filler = filler[:room]
    ctx: list[int] = []
    cursor = 0
    for d, f in fact_ids:
        cut = max(cursor, min(room, int(d * room)))
        ctx += filler[cursor:cut] + f
        cursor = cut
    ctx += filler[cursor:]

    q_ids, a_ids = _ids(tok, question), _ids(tok, answer_text)
    tail: list[int] = []
    while len(q_ids) + len(a_ids) + len(tail) < continuation:
        tail += _ids(tok, _sentence(rng))
    cont = (q_ids + a_ids + tail)[:continuation]
    if len(q_ids) + len(a_ids) > continuation:
        raise ValueError(f"continuation length {continuation} is too short for the question and answer")
    scored = torch.zeros(continuation, dtype=torch.bool)
    # score the answer's digits (the words around them are given away by the question)
    for i, t in enumerate(a_ids):
        if any(ch.isdigit() for ch in tok.decode([t])):
            scored[len(q_ids) + i] = True
    return Example(torch.tensor(ctx), torch.tensor(cont), scored, kind="retrieval")


def make_tasks(tok, count: int, context: int, continuation: int = 48, seed: int = 0) -> list[Example]:
    """`count` tasks cycling through variants and depths."""
    out = []
    for i in range(count):
        variant = VARIANTS[i % len(VARIANTS)]
        depth = DEPTHS[(i // len(VARIANTS)) % len(DEPTHS)]
        out.append(make_task(tok, context, continuation, variant, depth, seed * 100003 + i))
    return out


def text_examples(windows: torch.Tensor, context: int) -> list[Example]:
    """Natural-text windows: compress the first `context` tokens, score every continuation token."""
    m = windows.shape[1] - context
    scored = torch.ones(m, dtype=torch.bool)
    return [Example(w[:context], w[context:], scored) for w in windows]


def cut_continuations(examples: list[Example], tokens: int) -> list[Example]:
    """The same examples with only their first `tokens` continuation tokens. Attention is causal, so each kept
    token scores what it did in the whole continuation: the examples a shorter continuation would have given."""
    return [dataclasses.replace(e, continuation=e.continuation[:tokens], scored=e.scored[:tokens]) for e in examples]


def filler_text(sentences: int, seed: int = 0) -> str:
    """Generated prose for calibrating without any data: the same kind of filler the tasks hide facts in."""
    rng = random.Random(seed)
    return "".join(_sentence(rng) for _ in range(sentences)).strip()
