"""Shared test fixtures: a tiny SentencePiece model trained on made-up English."""

import random

import pytest

_SUBJECTS = ["The committee", "A young farmer", "Our neighbours", "The old lighthouse keeper", "Every student",
             "The government", "She", "They", "My grandmother", "The river", "A small café", "The engineers"]
_VERBS = ["built", "described", "ignored", "painted", "repaired", "discussed", "sold", "measured",
          "wrote about", "carried", "remembered", "photographed"]
_OBJECTS = ["a wooden bridge", "the harvest", "three letters", "the annual report", "an empty house",
            "the northern road", "forty-two apples", "a naïve plan", "the budget for 2024", "the storm",
            "the school library", "a map of the coast"]
_TAILS = ["yesterday", "in the morning", "before the winter", "with great care", "for the first time",
          "after a long debate", "near the station", "without asking anyone", "at 7:30 p.m.", "in 1887"]
_OPENERS = ["However,", "In the end,", "Surprisingly,", "As usual,", "According to the paper,", ""]


@pytest.fixture(scope="session")
def tiny_corpus_texts():
    """A few hundred lines of varied made-up English (deterministic; no files needed)."""
    rng = random.Random(1234)
    texts = []
    for _ in range(300):
        sentences = []
        for _ in range(rng.randint(1, 4)):
            opener = rng.choice(_OPENERS)
            subject = rng.choice(_SUBJECTS)
            if opener:
                subject = subject[0].lower() + subject[1:]
            words = [opener, subject, rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS)]
            end = rng.choice([".", ".", ".", "!", "?"])
            sentences.append(" ".join(w for w in words if w) + end)
        if rng.random() < 0.1:
            sentences.append(f"“{rng.choice(_OBJECTS).capitalize()},” she said — {rng.randint(2, 999)} times.")
        texts.append(" ".join(sentences))
    return texts


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory, tiny_corpus_texts):
    """A 200-piece unigram SentencePiece model with T5's ids, trained once per session."""
    from spactor_mega.data.tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("tiny_spm")
    return train_sentencepiece(iter(tiny_corpus_texts), out / "tiny", vocab_size=200)


@pytest.fixture(scope="session")
def hf_family(tmp_path_factory, tiny_spm):
    """``hf_family(name, config_style="hub")`` -> a small HF folder of that public T5 family
    (``tests/hf_families.py``: FAMILIES), built on first use and kept for the session."""
    from tests.hf_families import build_hf_family

    built = {}

    def get(name, config_style="hub"):
        key = (name, config_style)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"hf_{name}_{config_style}")
            built[key] = build_hf_family(name, folder, tiny_spm, config_style=config_style)
        return built[key]

    return get
