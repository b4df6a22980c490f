"""BatchFactory: training units -> one batch format for the seven learning setups.

The path of a row to a batch:

    examples (offline)                  --units_from_examples-->  units
    generations + annotations (online)  --units_from_online-->    units
    units  --BatchFactory.encode-->  encoded units  --BatchFactory.collate-->  batch

A *unit* (records.UNITS) is one prompt with one or two responses and their rewards. `encode` tokenises every
unit once (`alignment_core.rendering`: prompt through the chat template, responses with the template's
end-of-turn token appended; truncation as in the DPO reference implementation); `collate` pads a list of
encoded units into tensors.

Which generations and rewards a batch carries follows from the setup's row in `alignment_core.setups` (its
responses and its feedback):

    setup              generations  generation1_reward           generation2_reward   weights
    sft                1            None                         -                    1.0 unless reweighted
    reward_modelling   2            None                         None                 1.0 unless reweighted
    rl                 1            the annotator's scalar       -
    offline_pointwise  1            label: 1.0 / 0.0             -
    online_pointwise   1            label: 1.0 / 0.0             -
    offline_pairwise   2            1.0 (preferred)              0.0
    online_pairwise    2            1.0 (preferred)              0.0

In two-generation setups generation1 is always the preferred response (pairwise units are swapped into that
order and ties are dropped), because the losses rely on it. A batch also carries `prompt_id` (rl's groups) and,
when the Trainer precomputed them, `reference_logps` (one per generation, generation1's rows first).
"""

import logging
import math

import pandas as pd
import torch

from alignment_core.annotation.base import LABEL_STATUSES
from alignment_core.config import PipelineConfig, check_prompt_fits
from alignment_core.records import UNITS, from_rows
from alignment_core.rendering import chat_turns, prompt_text_to_ids, render_prompt_text, response_ids
from alignment_core.setups import setup_spec

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_end", "keep_start")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ---- units ---------------------------------------------------------------------------------------------
def _check_online(setup: str, online: bool, what: str) -> None:
    if setup_spec(setup).online != online:
        raise ValueError(f"{what} builds units for the {'online' if online else 'offline'} setups, not {setup!r}")


def _require(frame: pd.DataFrame, column: str, setup: str, id_column: str) -> None:
    """Every row must have `column`: an error names the setup, the column and the first offending row."""
    if column not in frame.columns:
        raise ValueError(f"setup {setup!r} needs column {column!r}, which the input does not have")
    missing = frame[column].map(_is_missing)
    if missing.any():
        first = frame.loc[missing, id_column].iloc[0]
        raise ValueError(
            f"setup {setup!r} needs {column!r} on every row; {int(missing.sum())} rows have none "
            f"(first: {id_column}={first!r})"
        )


def _check_labels(rewards, setup: str) -> None:
    bad = sorted({float(r) for r in rewards if float(r) not in (0.0, 1.0)})
    if bad:
        raise ValueError(f"setup {setup!r} needs labels 1.0 (desirable) or 0.0 (undesirable); got {bad[:5]}")


def units_from_examples(examples: pd.DataFrame, setup: str) -> pd.DataFrame:
    """Offline setups: training units from dataset examples (records.EXAMPLES); unit_id = example_id."""
    _check_online(setup, False, "units_from_examples")
    spec = setup_spec(setup)
    frame = examples.copy()
    if spec.feedback == "demonstration":
        # SFT learns the demonstration: the completion, or the chosen response of a preference pair.
        nothing = pd.Series(None, index=frame.index, dtype=object)
        completion, chosen = frame.get("completion", nothing), frame.get("chosen", nothing)
        frame["generation1_response"] = completion.where(~completion.map(_is_missing), chosen)
        missing = frame["generation1_response"].map(_is_missing)
        if missing.any():
            raise ValueError(
                f"setup 'sft' needs 'completion' or 'chosen' on every row; {int(missing.sum())} rows have "
                f"neither (first: example_id={frame.loc[missing, 'example_id'].iloc[0]!r})"
            )
    elif spec.responses == 2:
        _require(frame, "chosen", setup, "example_id")
        _require(frame, "rejected", setup, "example_id")
        frame["generation1_response"], frame["generation2_response"] = frame["chosen"], frame["rejected"]
        if spec.feedback == "preference":
            frame["generation1_reward"], frame["generation2_reward"] = 1.0, 0.0
    else:  # offline_pointwise
        _require(frame, "completion", setup, "example_id")
        _require(frame, "label", setup, "example_id")
        _check_labels(frame["label"], setup)
        frame["generation1_response"], frame["generation1_reward"] = frame["completion"], frame["label"]
    frame["unit_id"] = frame["example_id"]
    return _to_units(frame)


def _to_units(frame: pd.DataFrame) -> pd.DataFrame:
    rows = frame[[c for c in UNITS.names if c in frame.columns]].to_dict("records")
    for row in rows:
        row["prompt_messages"] = chat_turns(row["prompt_messages"])
        for key, value in row.items():
            if key != "prompt_messages" and _is_missing(value):
                row[key] = None
    return from_rows(rows, UNITS, "units").to_pandas()


def units_from_online(generations: pd.DataFrame, annotations: pd.DataFrame, setup: str) -> pd.DataFrame:
    """Online setups: annotations (records.ANNOTATIONS) joined to the generations they judged.

    unit_id = annotation_id. Only verdicts with a label status (LABEL_STATUSES: ok, tie) are used; the others
    (unparseable, error, skipped, unanswered, abstained) are counted and logged. Pairwise units are put in
    canonical order (see `canonicalise_pairs`).
    """
    _check_online(setup, True, "units_from_online")
    spec = setup_spec(setup)
    usable = annotations["status"].isin(LABEL_STATUSES)
    if (~usable).any():
        counts = annotations.loc[~usable, "status"].value_counts().to_dict()
        logger.warning("%s: skipping %d of %d annotations by status: %s", setup, int((~usable).sum()),
                       len(annotations), counts)
    frame = annotations[usable].reset_index(drop=True)
    expected_kind = "pairwise" if spec.responses == 2 else "pointwise"
    wrong_kind = frame["kind"] != expected_kind
    if wrong_kind.any():
        raise ValueError(
            f"setup {setup!r} needs {expected_kind} annotations; {int(wrong_kind.sum())} are "
            f"{sorted(set(frame.loc[wrong_kind, 'kind']))}"
        )
    _require(frame, "generation1_reward", setup, "annotation_id")

    by_id = generations.set_index("generation_id")
    if not by_id.index.is_unique:
        raise ValueError("generations: generation_id values are not unique")
    for side in spec.generations:
        _require(frame, f"{side}_id", setup, "annotation_id")
        unknown = ~frame[f"{side}_id"].isin(by_id.index)
        if unknown.any():
            raise KeyError(
                f"{int(unknown.sum())} annotations name a {side}_id that is not among the generations "
                f"(first: {frame.loc[unknown, f'{side}_id'].iloc[0]!r})"
            )
        frame[f"{side}_response"] = by_id.loc[frame[f"{side}_id"], "response"].to_numpy()
        frame[f"{side}_token_ids"] = by_id.loc[frame[f"{side}_id"], "response_token_ids"].to_numpy()
        frame[f"{side}_sampler_logp"] = by_id.loc[frame[f"{side}_id"], "sum_logprob"].to_numpy()
        frame[f"{side}_sampler_digest"] = by_id.loc[frame[f"{side}_id"], "policy_digest"].to_numpy()
        mismatched = by_id.loc[frame[f"{side}_id"], "prompt_id"].to_numpy() != frame["prompt_id"].to_numpy()
        if mismatched.any():
            raise ValueError(
                f"{int(mismatched.sum())} annotations name a {side}_id of another prompt than their "
                f"prompt_id (first: annotation_id={frame.loc[mismatched, 'annotation_id'].iloc[0]!r})"
            )
    joined = by_id.loc[frame["generation1_id"]]
    for column in ("prompt", "prompt_messages"):
        frame[column] = joined[column].to_numpy()
    if spec.responses == 2:
        _require(frame, "generation2_reward", setup, "annotation_id")
    else:
        for column in ("generation2_id", "generation2_response", "generation2_token_ids", "generation2_reward",
                       "generation2_sampler_logp", "generation2_sampler_digest"):
            frame[column] = None
    if spec.feedback == "label":
        _check_labels(frame["generation1_reward"], setup)
    frame["unit_id"] = frame["annotation_id"]
    units = _to_units(frame)
    return canonicalise_pairs(units, setup) if spec.feedback == "preference" else units


def canonicalise_pairs(units: pd.DataFrame, setup: str) -> pd.DataFrame:
    """Pairwise units with generation1 preferred and rewards 1.0 / 0.0; ties are dropped (counted, logged).

    A unit whose generation2_reward is higher has its two generations swapped, with everything that belongs
    to a generation: response, id, reward, score and (when joined) weight.
    """
    for column in ("generation1_reward", "generation2_reward"):
        _require(units, column, setup, "unit_id")
    units = units.copy()
    ties = units["generation1_reward"] == units["generation2_reward"]
    if ties.any():
        logger.warning("%s: dropping %d of %d pairs that are ties", setup, int(ties.sum()), len(units))
    units = units[~ties].reset_index(drop=True)
    swap = units["generation2_reward"] > units["generation1_reward"]
    pairs = [(f"generation1_{suffix}", f"generation2_{suffix}")
             for suffix in ("response", "token_ids", "id", "reward", "weight", "sampler_logp", "sampler_digest")]
    for first, second in [*pairs, ("score1", "score2")]:
        if first in units.columns:  # one column at a time: a two-column .loc swap corrupts mixed-dtype frames
            first_values = units.loc[swap, first].to_numpy(copy=True)
            units.loc[swap, first] = units.loc[swap, second].to_numpy()
            units.loc[swap, second] = first_values
    units["generation1_reward"], units["generation2_reward"] = 1.0, 0.0
    return units


# ---- tokenisation and batches ---------------------------------------------------------------------------
class BatchFactory:
    """Tokenises units once (`encode`) and pads them into batches (`collate`, `batches`)."""

    def __init__(self, tokenizer, setup: str, *, max_length: int, max_prompt_length: int,
                 truncation_mode: str = "keep_end"):
        self.spec = setup_spec(setup)
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"unknown truncation_mode {truncation_mode!r}; expected {TRUNCATION_MODES}")
        check_prompt_fits(max_prompt_length, max_length)  # the config's rule, for callers without a config
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs EOS and pad tokens (models.load_tokenizer sets the pad)")
        self.tokenizer = tokenizer
        self.setup = setup
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.generations = self.spec.generations

    @classmethod
    def from_config(cls, tokenizer, cfg: PipelineConfig) -> "BatchFactory":
        return cls(
            tokenizer, cfg.setup,
            max_length=cfg.training.max_length,
            max_prompt_length=cfg.training.max_prompt_length,
            truncation_mode=cfg.training.truncation_mode,
        )

    # ---- encode --------------------------------------------------------------------------------------
    def encode(self, units: pd.DataFrame, weights: pd.DataFrame | None = None) -> list[dict]:
        """One dict per unit with its token ids (truncated), texts, reward and weight."""
        units = self._join_weights(units, weights)
        if self.spec.feedback == "preference":
            units = canonicalise_pairs(units, self.setup)
        for side in self.generations:
            _require(units, f"{side}_response", self.setup, "unit_id")
        if self.spec.feedback in ("label", "reward"):
            _require(units, "generation1_reward", self.setup, "unit_id")
        if self.spec.feedback == "label":
            _check_labels(units["generation1_reward"], self.setup)

        prompt_cache: dict[str, tuple[str, list[int]]] = {}
        encoded = []
        for unit in units.to_dict("records"):
            messages = chat_turns(unit["prompt_messages"])
            key = repr(messages)
            if key not in prompt_cache:
                text = render_prompt_text(self.tokenizer, messages)
                prompt_cache[key] = (text, prompt_text_to_ids(self.tokenizer, text))
            prompt_text, prompt_ids = prompt_cache[key]
            responses = {side: self.response_ids(unit, side) for side in self.generations}
            truncated_prompt, truncated = self.truncate(prompt_ids, responses)
            item = {"unit_id": unit["unit_id"], "prompt_id": unit["prompt_id"], "prompt": prompt_text,
                    "prompt_ids": truncated_prompt}
            for side in self.generations:
                item[f"{side}_response_only"] = unit[f"{side}_response"]
                item[f"{side}_response_ids"] = truncated[side]
                item[f"{side}_sampler"] = self.sampler_logp(unit, side, truncated_prompt == prompt_ids
                                                            and truncated[side] == responses[side])
                reward = float(unit[f"{side}_reward"]) if self.spec.has_rewards else None
                item[f"{side}_reward"] = reward
                item[f"{side}_weight"] = float(unit[f"{side}_weight"])
            encoded.append(item)
        return encoded

    def response_ids(self, unit: dict, side: str) -> list[int]:
        """The tokens training learns for one side of a unit: the ones the policy sampled where the unit has them
        (online), its stop token included; else the text's tokens with the end-of-turn token appended. Sampled
        tokens are never re-tokenised from their decoded text, which can give other tokens: a byte-level token
        decoded alone is U+FFFD, and random-weight samples came back 24% longer that way."""
        sampled = unit.get(f"{side}_token_ids")
        if sampled is not None and len(sampled):
            return [int(token) for token in sampled]
        return response_ids(self.tokenizer, unit[f"{side}_response"])

    @staticmethod
    def sampler_logp(unit: dict, side: str, untruncated: bool) -> tuple[float, str] | None:
        """(summed log-prob, digest of the model) the sampler recorded for one side's tokens, where training sees
        exactly the tokens it sampled after exactly the prompt it sampled from: sampled tokens (the same
        rendering rule for the prompt as generation's) and neither truncated. Else None: another context."""
        logp, digest = unit.get(f"{side}_sampler_logp"), unit.get(f"{side}_sampler_digest")
        sampled = unit.get(f"{side}_token_ids")
        if not untruncated or _is_missing(logp) or _is_missing(digest) or sampled is None or not len(sampled):
            return None
        return float(logp), str(digest)

    def _join_weights(self, units: pd.DataFrame, weights: pd.DataFrame | None) -> pd.DataFrame:
        """Attach generation1_weight/generation2_weight by unit_id; without a weights table they are 1.0."""
        units = units.reset_index(drop=True)
        if weights is None:
            return units.assign(generation1_weight=1.0, generation2_weight=1.0)
        if not weights["unit_id"].is_unique:
            raise ValueError("weights: unit_id values are not unique")
        columns = ["unit_id"] + [f"{side}_weight" for side in self.generations]
        joined = units.merge(weights[columns], on="unit_id", how="left", validate="many_to_one")
        for side in self.generations:
            missing = joined[f"{side}_weight"].isna()
            if missing.any():
                raise ValueError(
                    f"weights: {int(missing.sum())} of {len(joined)} units have no {side}_weight "
                    f"(first: unit_id={joined.loc[missing, 'unit_id'].iloc[0]!r})"
                )
        return joined

    def truncate(self, prompt_ids: list[int], responses: dict[str, list[int]]) -> tuple[list[int], dict]:
        """Truncation of the DPO reference implementation (`tokenize_batch_element`).

        If the prompt and the longest response exceed max_length, the prompt is cut to max_prompt_length
        (keep_end keeps its last tokens, keep_start its first); if that is still too long, every response
        is cut to max_length - max_prompt_length (losing its EOS).
        """
        longest = max(len(ids) for ids in responses.values())
        if len(prompt_ids) + longest > self.max_length:
            if self.truncation_mode == "keep_end":
                prompt_ids = prompt_ids[-self.max_prompt_length:]
            else:
                prompt_ids = prompt_ids[: self.max_prompt_length]
        if len(prompt_ids) + longest > self.max_length:
            budget = self.max_length - self.max_prompt_length
            responses = {side: ids[:budget] for side, ids in responses.items()}
        return prompt_ids, responses

    # ---- collate ---------------------------------------------------------------------------------------
    def collate(self, encoded: list[dict]) -> dict:
        """Pad encoded units into one batch with exactly the keys of this setup.

        Token ids are right-padded with the pad id. Both generations are padded to the same length, so a
        trainer can concatenate them for one forward pass. Texts are the untruncated originals.
        """
        if not encoded:
            raise ValueError("cannot collate an empty list of units")
        pad_id = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = _pad([item["prompt_ids"] for item in encoded], pad_id)
        batch = {
            "prompt_id": [item["prompt_id"] for item in encoded],
            "prompt": [item["prompt"] for item in encoded],
            "prompt_token_ids": prompt_ids,
            "prompt_attention_mask": prompt_mask,
        }
        sequences = {
            side: [item["prompt_ids"] + item[f"{side}_response_ids"] for item in encoded]
            for side in self.generations
        }
        length = max(len(ids) for rows in sequences.values() for ids in rows)
        for side in self.generations:
            token_ids, attention_mask = _pad(sequences[side], pad_id, length)
            rewards = [item[f"{side}_reward"] for item in encoded]
            batch[side] = [item["prompt"] + item[f"{side}_response_only"] for item in encoded]
            batch[f"{side}_response_only"] = [item[f"{side}_response_only"] for item in encoded]
            batch[f"{side}_token_ids"] = token_ids
            batch[f"{side}_attention_mask"] = attention_mask
            batch[f"{side}_reward"] = torch.tensor(rewards) if self.spec.has_rewards else None
            batch[f"{side}_weight"] = torch.tensor([item[f"{side}_weight"] for item in encoded])
        if "reference_logps" in encoded[0]:  # precomputed by the Trainer: one per generation, generation-major
            batch["reference_logps"] = torch.tensor(
                [item["reference_logps"][k] for k in range(len(self.generations)) for item in encoded])
        return batch


def prompt_groups(encoded: list[dict]) -> list[list[int]]:
    """The indices of the encoded units of each prompt (by prompt_id), in order of first appearance: rl keeps
    a prompt's samples in one batch for its leave-one-out baseline."""
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(encoded):
        groups.setdefault(item["prompt_id"], []).append(index)
    return list(groups.values())


def _pad(rows: list[list[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (ids, attention mask) LongTensors of shape [len(rows), length]."""
    length = length or max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def response_mask(batch: dict, generation: str = "generation1") -> torch.Tensor:
    """BoolTensor [B, L]: True on the response tokens of `generation` (prompt and padding are False).

    The prompt occupies the first prompt_attention_mask.sum(1) positions of every generation's ids.
    """
    attention_mask = batch[f"{generation}_attention_mask"]
    prompt_lengths = batch["prompt_attention_mask"].sum(dim=1, keepdim=True)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)
    return (positions >= prompt_lengths) & attention_mask.bool()
