"""The data formats a source can be in, one adapter each, and how a source's format is detected from its columns
(the list of formats and what each reads: the package docstring). Ids are content hashes."""

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # adapters are handed the loader that calls them
    from alignment_core.data.loader import DatasetLoader

__all__ = [  # what the package re-exports
    "ADAPTERS",
    "ASSISTANT",
    "BadRow",
    "DETECT_MAX_ROWS",
    "DETECT_ROWS",
    "FORMAT_COLUMNS",
    "HH_TURN",
    "HUMAN",
    "PROMPT_ONLY_METADATA",
    "ROLES",
    "SCORED_RESPONSES",
    "SCORED_SCORES",
    "adapt_hh_rlhf",
    "adapt_messages_pairs",
    "adapt_pairs",
    "adapt_pointwise",
    "adapt_prompt_only",
    "adapt_scored",
    "adapt_sft",
    "detect_format",
    "parse_hh_prompt",
    "prompt_id",
    "render_prompt",
    "stable_hash",
]

logger = logging.getLogger(__name__)

DETECT_ROWS = 16  # format detection looks at the columns of this many readable leading rows
DETECT_MAX_ROWS = 1000  # ... reading past unreadable ones up to this many rows
ROLES = ("system", "user", "assistant")

# The turn markers of an HH-RLHF transcript.
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


# --- ids and prompt text ---------------------------------------------------------------------------------


def stable_hash(value: Any) -> str:
    """First 16 hex chars of the sha256 of the canonical JSON of `value` (sorted keys, no spaces)."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def prompt_id(prompt_messages: list[dict]) -> str:
    """The id of a prompt: a hash of its chat turns, so one prompt has one id whatever dataset it came from."""
    return stable_hash(prompt_messages)


def render_prompt(prompt_messages: list[dict]) -> str:
    """The prompt as plain text: a lone user turn is its content; longer chats are "Role: content" blocks."""
    if len(prompt_messages) == 1 and prompt_messages[0]["role"] == "user":
        return prompt_messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt_messages)


# --- row validation ----------------------------------------------------------------------------------------


class BadRow(Exception):
    """A source row that cannot become an example; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _field(row: dict, name: str) -> Any:
    if row.get(name) is None:
        raise BadRow("missing_field", f"missing field {name!r}")
    return row[name]


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRow("not_a_string", f"field {name!r} is {type(value).__name__}, expected a string")
    return value


def _response(value: Any, name: str) -> str:
    """An answer: a string with some non-blank text (kept verbatim)."""
    text = _string(value, name)
    if not text.strip():
        raise BadRow("empty_response", f"field {name!r} is empty")
    return text


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRow("invalid_score", f"field {name!r} is {value!r}, expected a finite number")
    return float(value)


def _messages(value: Any, name: str) -> list[dict]:
    """A list of {role, content} string turns, keeping only those two keys (ids hash exactly them)."""
    if not isinstance(value, list):
        raise BadRow("invalid_messages", f"field {name!r} is {type(value).__name__}, expected a list of turns")
    turns = []
    for i, turn in enumerate(value):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise BadRow("invalid_messages", f"{name}[{i}] is not a {{role, content}} turn of strings: {turn!r}")
        if turn["role"] not in ROLES:
            # A chat template renders other roles its own way or not at all: the policy would see another prompt.
            raise BadRow("invalid_role", f"{name}[{i}] has role {turn['role']!r}, expected one of {ROLES}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def _non_empty_prompt(turns: list[dict], name: str) -> list[dict]:
    """A prompt with text, and a user turn to answer (a system turn alone asks nothing)."""
    if not any(turn["content"].strip() for turn in turns):
        raise BadRow("empty_prompt", f"the prompt ({name!r}) is empty")
    if not any(turn["role"] == "user" for turn in turns):
        raise BadRow("no_user_turn", f"the prompt ({name!r}) has no user turn, only {[t['role'] for t in turns]}")
    return turns


def _prompt(value: Any, name: str = "prompt") -> list[dict]:
    """A prompt given as a string (one user turn) or as chat turns."""
    if isinstance(value, str):
        turns = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        turns = _messages(value, name)
    else:
        raise BadRow("not_a_string", f"field {name!r} is {type(value).__name__}, expected a string or turns")
    return _non_empty_prompt(turns, name)


def _split_final_answer(turns: list[dict], name: str) -> tuple[list[dict], str]:
    """(the turns before, the final assistant answer) of a chat."""
    if not turns or turns[-1]["role"] != "assistant":
        last = turns[-1]["role"] if turns else "nothing"
        raise BadRow("invalid_messages", f"{name!r} ends with {last!r}, expected an assistant turn")
    return turns[:-1], _response(turns[-1]["content"], f"{name}[-1].content")


def _prompt_and_completion(row: dict) -> tuple[list[dict], str]:
    """prompt + completion, where either may be chat turns (TRL's conversational format)."""
    prompt_messages = _prompt(_field(row, "prompt"))
    completion = _field(row, "completion")
    if isinstance(completion, list):
        leading, answer = _split_final_answer(_messages(completion, "completion"), "completion")
        return prompt_messages + leading, answer
    return prompt_messages, _response(completion, "completion")


def _check_distinct(chosen: str, rejected: str) -> None:
    if chosen == rejected:
        raise BadRow("identical_responses", "chosen and rejected are identical")


# --- adapters: one source row -> the format-specific example fields ------------------------------------------


def adapt_prompt_only(row: dict, loader: "DatasetLoader") -> dict:
    if row.get("prompt") is not None:
        return {"prompt_messages": _prompt(row["prompt"])}
    if row.get("messages") is None:
        raise BadRow("missing_field", "missing field 'prompt' (or 'messages')")
    turns = _messages(row["messages"], "messages")
    user_turns = [i for i, turn in enumerate(turns) if turn["role"] == "user"]
    if not user_turns:
        raise BadRow("empty_prompt", "'messages' has no user turn")
    return {"prompt_messages": _non_empty_prompt(turns[: user_turns[-1] + 1], "messages")}


def adapt_pairs(row: dict, loader: "DatasetLoader") -> dict:
    prompt_messages = _prompt(_field(row, "prompt"))
    chosen = _response(_field(row, "chosen"), "chosen")
    rejected = _response(_field(row, "rejected"), "rejected")
    _check_distinct(chosen, rejected)
    return {"prompt_messages": prompt_messages, "chosen": chosen, "rejected": rejected}


def parse_hh_prompt(prompt_text: str) -> list[dict]:
    """The turns of an HH transcript prefix ending in "\\n\\nAssistant:" (that last, empty turn is dropped)."""
    pieces = HH_TURN.split(prompt_text)  # [text before the first marker, role, content, role, content, ...]
    if pieces[0].strip():
        raise BadRow("unparseable_transcript", f"text before the first turn marker: {pieces[0][:40]!r}")
    roles, contents = pieces[1::2], pieces[2::2]
    if not roles or roles[0] != "Human":
        raise BadRow("unparseable_transcript", "the transcript does not start with a Human turn")
    role_names = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": role_names[r], "content": c.strip()} for r, c in zip(roles[:-1], contents[:-1], strict=True)]
    return turns


def adapt_hh_rlhf(row: dict, loader: "DatasetLoader") -> dict:
    chosen_text = _string(_field(row, "chosen"), "chosen")
    rejected_text = _string(_field(row, "rejected"), "rejected")
    _check_distinct(chosen_text, rejected_text)
    shared = len(os.path.commonprefix([chosen_text, rejected_text]))
    # The prompt ends at the last "\n\nAssistant:" lying wholly inside the shared prefix.
    marker = chosen_text.rfind(ASSISTANT, 0, shared)
    if marker < 0:
        raise BadRow("unparseable_transcript", "chosen and rejected share no '\\n\\nAssistant:' turn marker")
    prompt_end = marker + len(ASSISTANT)
    chosen, rejected = chosen_text[prompt_end:].strip(), rejected_text[prompt_end:].strip()
    if HUMAN in chosen or HUMAN in rejected:
        raise BadRow("unparseable_transcript", "chosen and rejected differ before their final Assistant turn")
    prompt_messages = _non_empty_prompt(parse_hh_prompt(chosen_text[:prompt_end]), "chosen")
    chosen, rejected = _response(chosen, "chosen"), _response(rejected, "rejected")
    return {"prompt_messages": prompt_messages, "chosen": chosen, "rejected": rejected}


def adapt_messages_pairs(row: dict, loader: "DatasetLoader") -> dict:
    chosen_leading, chosen = _split_final_answer(_messages(_field(row, "chosen"), "chosen"), "chosen")
    rejected_leading, rejected = _split_final_answer(_messages(_field(row, "rejected"), "rejected"), "rejected")
    if chosen_leading != rejected_leading:
        raise BadRow("mismatched_prompts", "chosen and rejected differ before their final assistant turn")
    _check_distinct(chosen, rejected)
    # UltraFeedback repeats the prompt as the leading turns (its `prompt` string is only a copy); TRL's
    # explicit-prompt form has no leading turns and the prompt only in `prompt`.
    if chosen_leading:
        prompt_messages = _non_empty_prompt(chosen_leading, "chosen")
    elif row.get("prompt") is not None:
        prompt_messages = _prompt(row["prompt"])
    else:
        raise BadRow("empty_prompt", "no 'prompt' and no turns before the answers")
    example = {"prompt_messages": prompt_messages, "chosen": chosen, "rejected": rejected}
    for source_name, name in (("score_chosen", "chosen_score"), ("score_rejected", "rejected_score")):
        if row.get(source_name) is not None:
            example[name] = _number(row[source_name], source_name)
    return example


def adapt_pointwise(row: dict, loader: "DatasetLoader") -> dict:
    prompt_messages, completion = _prompt_and_completion(row)
    label = _field(row, "label")
    if isinstance(label, bool) or (isinstance(label, (int, float)) and label in (0, 1)):
        return {"prompt_messages": prompt_messages, "completion": completion, "label": float(label)}
    raise BadRow("invalid_label", f"field 'label' is {label!r}, expected a bool or 0/1")


def adapt_sft(row: dict, loader: "DatasetLoader") -> dict:
    if row.get("completion") is None and row.get("messages") is not None:
        leading, completion = _split_final_answer(_messages(row["messages"], "messages"), "messages")
        return {"prompt_messages": _non_empty_prompt(leading, "messages"), "completion": completion}
    prompt_messages, completion = _prompt_and_completion(row)
    return {"prompt_messages": prompt_messages, "completion": completion}


def _column(row: dict, spellings: tuple[str, ...]) -> str:
    """The first of the spellings the row has a value for (else the first spelling: missing_field names it)."""
    return next((name for name in spellings if row.get(name) is not None), spellings[0])


def _scored_response(value: Any, name: str) -> str:
    """One response of a scored list: a string, or chat turns ending in the assistant's answer."""
    if isinstance(value, list):
        return _split_final_answer(_messages(value, name), name)[1]
    return _string(value, name)


def adapt_scored(row: dict, loader: "DatasetLoader") -> dict:
    prompt_messages = _prompt(_field(row, "prompt"))
    responses_name, scores_name = _column(row, SCORED_RESPONSES), _column(row, SCORED_SCORES)
    responses, scores = _field(row, responses_name), _field(row, scores_name)
    if not isinstance(responses, list) or not isinstance(scores, list):
        raise BadRow("not_a_list", f"fields {responses_name!r} and {scores_name!r} must both be lists")
    if len(responses) != len(scores):
        raise BadRow("length_mismatch", f"{len(responses)} {responses_name} but {len(scores)} {scores_name}")
    if len(responses) < 2:
        raise BadRow("length_mismatch", f"{len(responses)} {responses_name}: a pair needs at least 2")
    responses = [_scored_response(r, f"{responses_name}[{i}]") for i, r in enumerate(responses)]
    scores = [_number(s, f"{scores_name}[{i}]") for i, s in enumerate(scores)]
    best = max(range(len(scores)), key=scores.__getitem__)  # the first of equal scores, for determinism
    worst = min(range(len(scores)), key=scores.__getitem__)
    gap = scores[best] - scores[worst]
    if gap <= 0 or gap < loader.min_pair_margin:
        raise BadRow("below_margin", f"best-worst score gap {gap:g} (needs > 0 and >= {loader.min_pair_margin:g})")
    chosen = _response(responses[best], f"{responses_name}[{best}]")
    rejected = _response(responses[worst], f"{responses_name}[{worst}]")
    _check_distinct(chosen, rejected)
    return {
        "prompt_messages": prompt_messages,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_score": scores[best],
        "rejected_score": scores[worst],
    }


# Spellings of a scored list's columns in public datasets: responses and their scores, index for index.
SCORED_RESPONSES = ("responses", "completions", "outputs", "candidates", "generations")
SCORED_SCORES = ("scores", "rewards", "ratings")
# The columns each format reads (for messages that say what a source should look like).
FORMAT_COLUMNS = {
    "prompt_only": "prompt or messages",
    "pairs": "prompt, chosen, rejected",
    "hh_rlhf": "chosen, rejected transcripts",
    "messages_pairs": "chosen, rejected chat turns",
    "pointwise": "prompt, completion, label",
    "sft": "prompt, completion or messages",
    "scored": f"prompt, {'/'.join(SCORED_RESPONSES)}, {'/'.join(SCORED_SCORES)}",
}
# Columns that carry no training signal: beside them, a prompt column alone is a prompt_only source.
PROMPT_ONLY_METADATA = frozenset({
    "id", "idx", "index", "uid", "prompt_id", "example_id", "source", "dataset", "origin", "category",
    "categories", "task", "task_type", "type", "domain", "subset", "split", "tags", "tag", "lang", "language",
    "metadata", "meta", "info", "license", "url", "title", "created_at", "timestamp", "difficulty", "level",
})

ADAPTERS: dict[str, Callable[[dict, "DatasetLoader"], dict]] = {
    "prompt_only": adapt_prompt_only,
    "pairs": adapt_pairs,
    "hh_rlhf": adapt_hh_rlhf,
    "messages_pairs": adapt_messages_pairs,
    "pointwise": adapt_pointwise,
    "sft": adapt_sft,
    "scored": adapt_scored,
}


def detect_format(rows: list[dict]) -> str:
    """The adapter that fits the columns (and, where needed, the value types) of the given leading rows.

    prompt_only is detected only when every other column is known metadata (PROMPT_ONLY_METADATA): a column
    such as `response` or `reward` that no adapter reads would otherwise be dropped without a word, and an
    offline run would train on nothing it meant to. Such a source fails, naming the columns; rename them to a
    known spelling, or name `format: prompt_only` to load only the prompts.
    """
    columns = {name for row in rows for name, value in row.items() if value is not None}

    def first(name: str) -> Any:
        return next(row[name] for row in rows if row.get(name) is not None)

    if "prompt" in columns and columns & set(SCORED_RESPONSES) and columns & set(SCORED_SCORES):
        return "scored"
    if {"chosen", "rejected"} <= columns:
        if isinstance(first("chosen"), list):
            return "messages_pairs"
        return "pairs" if "prompt" in columns else "hh_rlhf"
    if {"completion", "label"} <= columns:
        return "pointwise"
    if {"prompt", "completion"} <= columns:
        return "sft"
    fmt = None
    if "messages" in columns:
        last_turn = (first("messages") or [None])[-1]
        fmt = "sft" if isinstance(last_turn, dict) and last_turn.get("role") == "assistant" else "prompt_only"
    elif "prompt" in columns:
        fmt = "prompt_only"
    known = "; ".join(f"{name}: {spelled}" for name, spelled in FORMAT_COLUMNS.items())
    if fmt is None:
        raise ValueError(f"cannot detect the data format from columns {sorted(columns)}; the known formats read "
                         f"({known}); name one with format=, or map your columns onto those names with columns= "
                         "(e.g. Alpaca's: {prompt: [instruction, input], completion: output})")
    unread = sorted(columns - {"prompt", "messages"} - PROMPT_ONLY_METADATA)
    if fmt == "prompt_only" and unread:
        raise ValueError(
            f"cannot detect the data format from columns {sorted(columns)}: as prompt_only, columns {unread} "
            f"would not be read. The known formats read ({known}). Rename the columns to a known spelling, name "
            "the format with format=, or format=prompt_only to load the prompts alone"
        )
    return fmt
