"""A reward function that takes its time, for tests that need a flow run still at work a while (the true reward
of the toy task, 0.3 s a response)."""

import time

from alignment_core.rewards import positive_words


def positive_words_slowly(prompt: str, response: str) -> float:
    time.sleep(0.3)
    return positive_words(prompt, response)
