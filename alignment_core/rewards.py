"""Rule-based rewards for the project's toy task: "answer in a positive, friendly tone, briefly".

They are the "true reward" of the tiny setup (the programmatic annotator calls them by import path,
`alignment_core.rewards:positive_words`), so an experiment can check that alignment moves the policy toward
it. Each has the signature `(prompt: str, response: str) -> float`.

The reward is built so that the two obvious hacks do not pay:
- repeating one positive word: only *distinct* positive words count;
- writing more: every word beyond `FREE_WORDS` costs `LENGTH_PENALTY`, so padding lowers the reward.
"""

import re

# The tiny tokenizer (alignment_core.tiny) learns each of these as one token, so the tiny policy can
# actually move toward them. A tuple: its order feeds the tiny corpus, which must be deterministic.
POSITIVE_WORDS = tuple(
    "good great happy love wonderful excellent kind bright joy nice glad calm warm friendly helpful "
    "beautiful amazing fantastic lovely pleasant cheerful gentle brilliant perfect best".split()
)
_POSITIVE = frozenset(POSITIVE_WORDS)
FREE_WORDS = 20  # responses up to this many words pay no length penalty
LENGTH_PENALTY = 0.05  # reward lost per word beyond FREE_WORDS

_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    """Lower-cased words of `text` (letters and apostrophes), punctuation dropped."""
    return _WORD.findall(text.lower())


def positive_words(prompt: str, response: str) -> float:
    """Distinct positive words in the response, minus 0.05 per word beyond the first 20.

    >>> positive_words("", "A great day, and a happy one.")
    2.0
    >>> positive_words("", "great " * 30)  # one distinct word, 10 words over the limit
    0.5
    """
    response_words = words(response)
    distinct_positive = len(_POSITIVE.intersection(response_words))
    excess_words = max(0, len(response_words) - FREE_WORDS)
    return float(distinct_positive - LENGTH_PENALTY * excess_words)


def response_length(prompt: str, response: str) -> float:
    """The number of words in the response (a deliberately hackable reward, for length-bias experiments)."""
    return float(len(words(response)))
