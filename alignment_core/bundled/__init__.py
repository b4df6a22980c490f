"""Small hand-made datasets shipped inside the package, loaded as `DatasetLoader("bundled:<name>")`.

The .jsonl files are written by `make_bundled.py` in this folder (deterministic: rerunning it rewrites the
same bytes) and committed:

- preferences.jsonl  prompt/chosen/rejected: chosen answers are short and use positive words; rejected ones are
                     neutral, negative or padded. The domain of the "positive words" experiment
                     (alignment_core.rewards.positive_words scores every chosen answer above its rejected one).
- prompts.jsonl      prompt only; the last HELD_OUT_PROMPTS rows use topics that appear in no other bundled file.
- sft.jsonl          prompt/completion of plain word-like text, so an SFT round teaches a tiny model to write words.
- pointwise.jsonl    prompt/completion/label (KTO-style unpaired feedback): label true for a positive answer.
"""
