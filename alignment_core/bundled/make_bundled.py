"""Write the bundled datasets of this folder from a small vocabulary and a seeded RNG.

    python -m alignment_core.bundled.make_bundled

Rerunning it rewrites the same bytes. The words come from the word lists the tiny tokenizer is trained on
(alignment_core.tiny), so the tiny model's ~1k-token BPE covers them in few tokens.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SEED = 0

N_PREFERENCES = 300
N_PROMPTS = 200
HELD_OUT_PROMPTS = 40  # the tail of prompts.jsonl: prompts about topics no other bundled file mentions
N_SFT = 300
N_POINTWISE = 200

TOPICS = (
    "weather sun sky rain garden river tree cat dog bird morning night day home house city school "
    "friend team game song music book food road room story picture week year child mother father door "
    "table party art plan office"
).split()
HELD_OUT_TOPICS = "moon window letter movie water".split()

# Each topic prompt takes "the <topic>"; the personal prompts carry the topic their answer talks about.
PROMPT_TEMPLATES = [
    "Tell me about the {t}.",
    "Describe the {t}.",
    "What do you think of the {t}?",
    "How do you feel about the {t}?",
    "Say something about the {t}.",
    "Write a short note about the {t}.",
    "Talk about the {t}.",
    "What is the {t} like today?",
]
PERSONAL_PROMPTS = [
    ("Describe your day.", "day"),
    ("How was your morning?", "morning"),
    ("Tell me about your home.", "home"),
    ("Tell me about your friend.", "friend"),
    ("What did you eat today?", "food"),
    ("How was your night?", "night"),
    ("What song do you like?", "song"),
    ("What book did you read?", "book"),
]

# Positive words are those alignment_core.rewards.positive_words counts.
POSITIVE_ADJECTIVES = "good great wonderful excellent nice bright kind lovely beautiful pleasant".split()
POSITIVE_FEELINGS = "happy glad calm cheerful".split()
NEGATIVE_ADJECTIVES = "bad poor cold dark dull slow old".split()
NEGATIVE_FEELINGS = "sad tired angry bored".split()

POSITIVE_SENTENCES = [
    "The {t} is {pos} today.",
    "I love the {t}.",
    "The {t} makes me feel {feel}.",
    "It was a {pos} {t}.",
    "The {t} brings me joy.",
    "What a {pos} {t}.",
    "I feel {feel} and {feel2}.",
    "Everyone was kind and friendly.",
    "It is {pos} and {pos2}.",
]
NEGATIVE_SENTENCES = [
    "The {t} is {neg} today.",
    "I do not like the {t}.",
    "The {t} makes me feel {bad}.",
    "It was a {neg} {t}.",
    "It was {neg} and {neg2}.",
    "I feel {bad}.",
]
NEUTRAL_SENTENCES = [
    "The {t} is there.",
    "I saw the {t}.",
    "There is a {t} near the road.",
    "The {t} was the same as last week.",
    "I have to say something about the {t}.",
    "Some people talk about the {t}.",
    "The {t} has a name and a place.",
    "It is a {t} like any other {t}.",
    "I think about the {t} at times.",
    "There is not much more to say.",
]


def fill(rng: random.Random, template: str, topic: str) -> str:
    """Fill a sentence template; the paired slots ({pos2}, ...) never repeat their first word."""
    pos, pos2 = rng.sample(POSITIVE_ADJECTIVES, 2)
    feel, feel2 = rng.sample(POSITIVE_FEELINGS, 2)
    neg, neg2 = rng.sample(NEGATIVE_ADJECTIVES, 2)
    bad = rng.choice(NEGATIVE_FEELINGS)
    return template.format(t=topic, pos=pos, pos2=pos2, feel=feel, feel2=feel2, neg=neg, neg2=neg2, bad=bad)


def sentences(rng: random.Random, templates: list[str], topic: str, count: int) -> str:
    return " ".join(fill(rng, template, topic) for template in rng.sample(templates, count))


def positive_answer(rng: random.Random, topic: str) -> str:
    """Two or three short sentences with positive words: well under 20 words."""
    return sentences(rng, POSITIVE_SENTENCES, topic, rng.choice([2, 2, 3]))


def negative_answer(rng: random.Random, topic: str) -> str:
    return sentences(rng, NEGATIVE_SENTENCES, topic, rng.choice([2, 3]))


def neutral_answer(rng: random.Random, topic: str) -> str:
    return sentences(rng, NEUTRAL_SENTENCES, topic, rng.choice([2, 3]))


def padded_answer(rng: random.Random, topic: str) -> str:
    """An overly long answer: one positive sentence buried in many neutral ones (40-70 words)."""
    filler = [fill(rng, t, topic) for t in rng.sample(NEUTRAL_SENTENCES, rng.randint(7, 10))]
    filler.insert(rng.randrange(len(filler)), fill(rng, rng.choice(POSITIVE_SENTENCES[:3]), topic))
    return " ".join(filler)


def worse_answer(rng: random.Random, topic: str) -> str:
    return rng.choice([negative_answer, negative_answer, neutral_answer, padded_answer])(rng, topic)


def prompt_pool(topics: list[str], personal: bool) -> list[tuple[str, str]]:
    """All (prompt, topic) pairs of the templates over `topics`, plus the personal prompts."""
    pool = [(template.format(t=topic), topic) for topic in topics for template in PROMPT_TEMPLATES]
    return pool + (PERSONAL_PROMPTS if personal else [])


def unique_rows(rng: random.Random, count: int, make_row) -> list[dict]:
    """`count` distinct rows from `make_row(rng)`: the loader would count a repeated row as a duplicate."""
    rows, seen = [], set()
    while len(rows) < count:
        row = make_row(rng)
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def make_preferences(rng: random.Random, pool: list[tuple[str, str]]) -> list[dict]:
    prompts = rng.sample(pool, N_PREFERENCES)  # each prompt once, so load_prompts() gives 300 prompts too
    rows = []
    for prompt, topic in prompts:
        rows.append({"prompt": prompt, "chosen": positive_answer(rng, topic), "rejected": worse_answer(rng, topic)})
    return rows


def make_prompts(rng: random.Random, pool: list[tuple[str, str]], held_out: list[tuple[str, str]]) -> list[dict]:
    seen = [prompt for prompt, _ in rng.sample(pool, N_PROMPTS - HELD_OUT_PROMPTS)]
    unseen = [prompt for prompt, _ in rng.sample(held_out, HELD_OUT_PROMPTS)]
    return [{"prompt": prompt} for prompt in seen + unseen]


def make_sft(rng: random.Random, pool: list[tuple[str, str]]) -> list[dict]:
    """Plain word-like answers, mostly neutral: SFT teaches writing words, not (yet) the positive tone."""

    def row(rng):
        prompt, topic = rng.choice(pool)
        answer = rng.choice([neutral_answer, neutral_answer, positive_answer, negative_answer])(rng, topic)
        return {"prompt": prompt, "completion": answer}

    return unique_rows(rng, N_SFT, row)


def make_pointwise(rng: random.Random, pool: list[tuple[str, str]]) -> list[dict]:
    def row(rng):
        prompt, topic = rng.choice(pool)
        desirable = rng.random() < 0.5
        answer = positive_answer(rng, topic) if desirable else worse_answer(rng, topic)
        return {"prompt": prompt, "completion": answer, "label": desirable}

    return unique_rows(rng, N_POINTWISE, row)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    rng = random.Random(SEED)
    pool = prompt_pool(TOPICS, personal=True)
    held_out = prompt_pool(HELD_OUT_TOPICS, personal=False)
    write_jsonl(HERE / "preferences.jsonl", make_preferences(rng, pool))
    write_jsonl(HERE / "prompts.jsonl", make_prompts(rng, pool, held_out))
    write_jsonl(HERE / "sft.jsonl", make_sft(rng, pool))
    write_jsonl(HERE / "pointwise.jsonl", make_pointwise(rng, pool))


if __name__ == "__main__":
    main()
