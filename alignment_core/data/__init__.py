"""DatasetLoader: turn a dataset in one of the common public formats into normalised example rows.

A source is a hub dataset name (or a local dataset folder), a `.jsonl` / `.json` / `.parquet` / `.csv` file
(local or any fsspec URL), or `bundled:<name>` for the small datasets shipped in `alignment_core/bundled/`.
Every source goes through one adapter, picked from the columns of its first readable rows (unreadable ones are
read past, up to DETECT_MAX_ROWS) or named by `format`; `columns` first renames a source's own columns onto
the names below (or joins several into one):

    prompt_only     prompt (string or chat turns), or messages whose prompt ends at the last user turn
    pairs           prompt, chosen, rejected strings
    hh_rlhf         Anthropic HH-RLHF: chosen and rejected are whole "\\n\\nHuman: ... \\n\\nAssistant: ..."
                    transcripts; the shared part up to the last "\\n\\nAssistant:" is the prompt
    messages_pairs  UltraFeedback-binarized: chosen and rejected are chat turn lists that share their leading
                    turns (the prompt) and end in the two assistant answers; optional score_chosen/score_rejected
    pointwise       prompt, completion, label (bool or 0/1): KTO-style unpaired feedback
    sft             prompt and completion, or messages ending in the assistant answer
    scored          prompt, responses (list of strings), scores (list of numbers): best vs worst becomes a pair

The output is a `records.EXAMPLES` table. Ids are content hashes, so the same content gets the same id in
every load and on every machine. A row that cannot be read (missing field, wrong type, empty prompt or
answer, identical answers, unparseable transcript, a prompt without a user turn, a role other than system,
user or assistant, ...) is skipped and counted per reason in `report`, or, with `on_bad_row="fail"`, raises a
ValueError naming the row, the format and the problem.

The package: `formats.py` (the adapters and format detection), `readers.py` (files, bundled and hub datasets,
column mapping), `loader.py` (`DatasetLoader` and its `LoadReport`).
"""

from alignment_core.config import BUNDLED_PREFIX, DATA_FILE_SUFFIXES, DATA_FORMATS  # noqa: F401, E402
from alignment_core.data.formats import *  # noqa: F403  (its __all__)
from alignment_core.data.loader import *  # noqa: F403  (its __all__)
from alignment_core.data.readers import *  # noqa: F403  (its __all__)
