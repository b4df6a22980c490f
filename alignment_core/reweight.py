"""SampleReweighter: one weight per training unit (records.UNITS row), written as the `weights` stage.

Every strategy first computes a positive raw weight per unit, then the stage is normalised to mean 1, so
the loss scale does not depend on the strategy. Weights whose effective sample fraction,
(sum w)^2 / (n sum w^2), is below `min_effective_sample_fraction` fall back to uniform: a few units carrying
most of the weight train on a handful of examples (logged; each row's inputs say so). A pair's two
generations get the same weight (the loss is over the pair); single-generation units leave
generation2_weight null. Each row keeps, as JSON, the inputs its weight came from. `temperature` (T) and `clip`
(c) come from ReweightConfig.

    uniform           1
    margin            sigmoid(|s1 - s2| / T): s = score1/score2 columns where present (e.g. reward-model
                      scores joined from the annotations), else generation1/2_reward. In [0.5, 1): pairs
                      the annotator barely separated count up to half as much as clear ones. Pairs only.
    judge_confidence  sigmoid(confidence / T) where the judge's log-prob gap is known (the judge's two-way
                      probability of its verdict at T=1); else 1 when both orders agreed, 0.5 when they
                      disagreed (a tie); a unit with neither gets the mean of the others' raw weights.
    importance        s = (log pi(y|x) - log mu(y|x)) / T: the current policy pi over the behaviour policy mu
                      that wrote the responses (the distribution shift), tempered (T > 1 flattens
                      sequence-level ratios, which between two different models span tens of nats);
                      self-normalised, log w = s - log mean exp(s); then clipped to [1/c, c]. Needs columns
                      generation{1,2}_policy_logp and generation{1,2}_behaviour_logp.
                      A pair uses the product of its two responses' ratios (the sum of log ratios: the pair
                      is one sample whose probability is that of both responses; `importance_pair: joint`) or
                      their geometric mean (`mean`: half the spread).
    length_debias     gap = words(chosen) - words(rejected) per pair (0 for ties); typical = the stage median
                      of |gap|; weight = max(exp(-max(0, gap - typical) / (T * max(typical, 1))), 1/c). Pairs
                      whose chosen response is longer than typical by much look like length-driven preferences
                      and count less; shorter-chosen and typical pairs keep weight 1. Pairs only.
"""

import json
import logging
import math
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from alignment_core.batches import BatchFactory
from alignment_core.config import PipelineConfig, ReweightConfig, check_reweight_clip
from alignment_core.logprobs import concatenated_inputs, sequence_logps
from alignment_core.models import causal_lm_to_run, load_tokenizer, resolve_model_path
from alignment_core.records import WEIGHTS, conform
from alignment_core.store import ArtifactStore

log = logging.getLogger(__name__)

IMPORTANCE_COLUMNS = ("policy_logp", "behaviour_logp")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value is not pd.NA


def _is_pair(row: pd.Series) -> bool:
    return _present(row.get("generation2_response"))


class SampleReweighter:
    def __init__(self, cfg: ReweightConfig):
        check_reweight_clip(cfg.clip)  # the config's own rule (a copy made with model_copy is not validated)
        self.cfg = cfg
        self.strategy = cfg.strategy

    def weigh(self, units: pd.DataFrame) -> pd.DataFrame:
        """WEIGHTS rows, one per unit, in the units' order; weights have mean 1 over `units`."""
        if len(units) == 0:
            return WEIGHTS.empty_table().to_pandas()
        method = getattr(self, f"_{self.strategy}", None)
        if method is None:
            raise ValueError(f"unknown reweight strategy {self.strategy!r}")
        rows = [row for _, row in units.iterrows()]
        raw, inputs = method(rows)
        raw = np.asarray(raw, dtype=np.float64)
        if not np.all(np.isfinite(raw)) or np.any(raw <= 0):
            bad = int(np.flatnonzero(~np.isfinite(raw) | (raw <= 0))[0])
            raise ValueError(f"{self.strategy}: unit {rows[bad]['unit_id']!r} got the raw weight {raw[bad]}")
        weights = raw / raw.mean()
        effective = effective_sample_fraction(weights)
        fallback = effective < self.cfg.min_effective_sample_fraction
        if fallback:
            log.warning("%s weights: effective sample fraction %.3f < reweight.min_effective_sample_fraction %.3f: "
                        "uniform weights instead", self.strategy, effective, self.cfg.min_effective_sample_fraction)
            weights = np.ones_like(weights)
            inputs = [{**i, "fallback_uniform": True, "effective_sample_fraction": effective} for i in inputs]
        return pd.DataFrame(
            {
                "unit_id": [row["unit_id"] for row in rows],
                "strategy": self.strategy,
                "generation1_weight": weights,
                "generation2_weight": [
                    w if _is_pair(row) else None for w, row in zip(weights, rows, strict=True)
                ],
                "inputs": [
                    json.dumps({**i, "raw_weight": float(r)}) for i, r in zip(inputs, raw, strict=True)
                ],
            }
        )

    # ---- strategies: each returns (raw weight per unit, inputs per unit) ----------------------------------
    def _uniform(self, rows: list[pd.Series]):
        return [1.0] * len(rows), [{} for _ in rows]

    def _margin(self, rows: list[pd.Series]):
        raw, inputs = [], []
        for row in self._pairs_only(rows):
            s1, s2 = self._score(row, 1), self._score(row, 2)
            margin = abs(s1 - s2)
            raw.append(_sigmoid(margin / self.cfg.temperature))
            inputs.append({"score1": s1, "score2": s2, "margin": margin})
        return raw, inputs

    def _judge_confidence(self, rows: list[pd.Series]):
        raw, inputs = [], []
        for row in rows:
            confidence, agreement = row.get("confidence"), row.get("agreement")
            if _present(confidence):
                raw.append(_sigmoid(float(confidence) / self.cfg.temperature))
                inputs.append({"confidence": float(confidence)})
            elif _present(agreement):
                raw.append(1.0 if bool(agreement) else 0.5)
                inputs.append({"agreement": bool(agreement)})
            else:
                raw.append(None)
                inputs.append({"filled": "stage mean"})
        known = [w for w in raw if w is not None]
        if not known:
            raise ValueError(
                "judge_confidence needs a `confidence` or `agreement` value on some unit; none has one"
            )
        fill = sum(known) / len(known)
        return [fill if w is None else w for w in raw], inputs

    def _importance(self, rows: list[pd.Series]):
        log_ratios, inputs = [], []
        log_clip = math.log(self.cfg.clip)
        for row in rows:
            log_ratio, used = 0.0, {}
            for g in (1, 2) if _is_pair(row) else (1,):
                policy, behaviour = (row.get(f"generation{g}_{c}") for c in IMPORTANCE_COLUMNS)
                if not (_present(policy) and _present(behaviour)):
                    raise ValueError(
                        f"importance: unit {row['unit_id']!r} lacks generation{g}_policy_logp / "
                        f"generation{g}_behaviour_logp (compute them with add_importance_inputs)"
                    )
                log_ratio += float(policy) - float(behaviour)
                used.update(
                    {
                        f"generation{g}_policy_logp": float(policy),
                        f"generation{g}_behaviour_logp": float(behaviour),
                    }
                )
            if self.cfg.importance_pair == "mean":
                log_ratio /= len(used) // 2
            log_ratios.append(log_ratio)
            inputs.append({**used, "log_ratio": log_ratio})
        # Self-normalise first (log w = s - log mean exp s), then clip: clipping raw ratios instead would turn
        # a policy that drifted far from the behaviour model (every ratio < 1/c) into uniform weights.
        tempered = np.asarray(log_ratios) / self.cfg.temperature
        normalised = tempered - (np.logaddexp.reduce(tempered) - math.log(len(tempered)))
        clipped = np.clip(normalised, -log_clip, log_clip)
        for row_inputs, value, bound in zip(inputs, normalised, clipped, strict=True):
            row_inputs["clipped"] = bool(value != bound)
        return np.exp(clipped).tolist(), inputs

    def _length_debias(self, rows: list[pd.Series]):
        gaps, inputs = [], []
        for row in self._pairs_only(rows):
            r1, r2 = row.get("generation1_reward"), row.get("generation2_reward")
            words1, words2 = (
                len(row["generation1_response"].split()),
                len(row["generation2_response"].split()),
            )
            if not (_present(r1) and _present(r2)):
                raise ValueError(f"length_debias: unit {row['unit_id']!r} lacks generation1/2_reward")
            gap = 0 if r1 == r2 else (words1 - words2 if r1 > r2 else words2 - words1)
            gaps.append(gap)
            inputs.append({"words1": words1, "words2": words2, "chosen_minus_rejected_words": gap})
        typical = float(np.median(np.abs(gaps)))
        scale = self.cfg.temperature * max(typical, 1.0)
        raw = [max(math.exp(-max(0.0, gap - typical) / scale), 1.0 / self.cfg.clip) for gap in gaps]
        for item in inputs:
            item["typical_gap"] = typical
        return raw, inputs

    # ---- helpers --------------------------------------------------------------------------------------
    def _pairs_only(self, rows: list[pd.Series]) -> list[pd.Series]:
        singles = [row["unit_id"] for row in rows if not _is_pair(row)]
        if singles:
            raise ValueError(
                f"reweight strategy {self.strategy!r} weighs pairs, but {len(singles)} units have one "
                f"generation (first: {singles[0]!r})"
            )
        return rows

    def _score(self, row: pd.Series, g: int) -> float:
        for column in (f"score{g}", f"generation{g}_reward"):
            if _present(row.get(column)):
                return float(row[column])
        raise ValueError(f"margin: unit {row['unit_id']!r} has neither score{g} nor generation{g}_reward")


# ---- importance inputs -----------------------------------------------------------------------------------
# The importance ratio is of the whole texts the behaviour model wrote: no truncation to training's max_length.
_WHOLE_SEQUENCE = sys.maxsize


@torch.no_grad()
def sequence_logprobs(
    model,
    tokenizer,
    prompt_messages_list: Sequence[list[dict]],
    responses: Sequence[str],
    batch_size: int = 8,
    response_token_ids: Sequence[list[int]] | None = None,
) -> list[float]:
    """log p(response + EOS | prompt) under `model`, teacher-forced, one float per (prompt, response).

    The sequences are built as training builds them, untruncated: `BatchFactory.encode` (the prompt through
    the chat template with the generation prompt, the response closed with EOS, or `response_token_ids` as they
    were sampled) and `collate`; the log-prob is `logprobs.sequence_logps` summed over the response tokens
    (`concatenated_inputs`' response mask). The tokenizer needs EOS and pad tokens (`models.load_tokenizer` sets
    the pad).
    """
    if len(prompt_messages_list) != len(responses):
        raise ValueError(f"{len(prompt_messages_list)} prompts for {len(responses)} responses")
    if tokenizer.eos_token_id is None:
        raise ValueError("sequence_logprobs needs a tokenizer with an EOS token")
    ids = [str(i) for i in range(len(responses))]
    units = pd.DataFrame({"unit_id": ids, "prompt_id": ids, "prompt_messages": list(prompt_messages_list),
                          "generation1_response": list(responses)})
    if response_token_ids is not None:
        units["generation1_token_ids"] = list(response_token_ids)
    factory = BatchFactory(tokenizer, "sft", max_length=_WHOLE_SEQUENCE, max_prompt_length=_WHOLE_SEQUENCE - 1)
    encoded = factory.encode(units) if len(units) else []
    device = next(model.parameters()).device
    totals: list[float] = []
    for start in range(0, len(encoded), batch_size):
        batch = factory.collate(encoded[start : start + batch_size])
        inputs = concatenated_inputs(batch, factory.generations, tokenizer.pad_token_id)
        logps, _ = sequence_logps(model, *(tensor.to(device) for tensor in inputs))
        totals += logps.tolist()
    return totals


def scoring_model(path: str, dtype: str, attn_implementation: str | None = None):
    """(tokenizer, model) of the causal LM at `path`, in eval mode, on the GPU where there is one: loaded as the
    sampler loads it, so that a pipeline keeping models scores with the model it sampled with."""
    model = causal_lm_to_run(path, dtype=dtype, attn_implementation=attn_implementation).eval()
    return load_tokenizer(path), model.to("cuda") if torch.cuda.is_available() else model


def add_importance_inputs(
    units: pd.DataFrame, policy_path: str, behaviour_path: str, batch_size: int = 8, dtype: str = "float32",
    attn_implementation: str | None = None,
) -> pd.DataFrame:
    """`units` with generation{1,2}_policy_logp and generation{1,2}_behaviour_logp columns added.

    Each model scores the text with its own tokenizer: a sequence's probability is a property of the text,
    so the two models need not share a vocabulary.
    """
    units = units.copy()
    is_pair = units["generation2_response"].notna()
    for role, path in (("policy", policy_path), ("behaviour", behaviour_path)):
        tokenizer, model = scoring_model(path, dtype, attn_implementation)
        messages = list(units["prompt_messages"])
        units[f"generation1_{role}_logp"] = sequence_logprobs(
            model, tokenizer, messages, list(units["generation1_response"]), batch_size
        )
        pair_logps = sequence_logprobs(
            model,
            tokenizer,
            [m for m, p in zip(messages, is_pair, strict=True) if p],
            list(units.loc[is_pair, "generation2_response"]),
            batch_size,
        )
        units[f"generation2_{role}_logp"] = None
        units.loc[is_pair, f"generation2_{role}_logp"] = pair_logps
        del model
    return units


def add_sampler_importance_inputs(
    units: pd.DataFrame, policy_path: str, batch_size: int = 8, dtype: str = "float32",
    attn_implementation: str | None = None,
) -> pd.DataFrame:
    """`units` with the same columns as `add_importance_inputs`, the behaviour model being the checkpoint that
    sampled each response (`reweight.behaviour_model: sampler`): its log-prob is the one it recorded then (raw:
    before temperature and top-p), and the policy's is over the very tokens it sampled."""
    units = units.copy()
    for column in ("generation1_token_ids", "generation2_token_ids", "generation1_sampler_logp",
                   "generation2_sampler_logp"):
        if column not in units.columns:  # (units built by hand; a stage's units have every column)
            units[column] = None
    sides = {g: units[units[f"generation{g}_response"].notna()] for g in (1, 2)}
    for g, rows in sides.items():  # before any model loads
        unsampled = rows[rows[f"generation{g}_token_ids"].map(lambda ids: ids is None or len(ids) == 0)
                         | rows[f"generation{g}_sampler_logp"].isna()]
        if len(unsampled):
            raise ValueError(f"reweight.behaviour_model 'sampler': unit {unsampled['unit_id'].iloc[0]!r} has no "
                             f"sampled tokens or no sampler log-prob for generation{g} ({len(unsampled)} units); only "
                             "online units carry them")
    tokenizer, model = scoring_model(policy_path, dtype, attn_implementation)
    for g, rows in sides.items():
        units[f"generation{g}_behaviour_logp"] = None
        units.loc[rows.index, f"generation{g}_behaviour_logp"] = rows[f"generation{g}_sampler_logp"].astype(float)
        units[f"generation{g}_policy_logp"] = None
        units.loc[rows.index, f"generation{g}_policy_logp"] = sequence_logprobs(
            model, tokenizer, list(rows["prompt_messages"]), list(rows[f"generation{g}_response"]), batch_size,
            response_token_ids=list(rows[f"generation{g}_token_ids"]))
    del model
    return units


def effective_sample_fraction(weights: np.ndarray) -> float:
    """The effective sample size, (sum w)^2 / sum w^2, as a fraction of n: 1 for equal weights."""
    return float(weights.sum() ** 2 / (weights**2).sum() / len(weights))


def weights_summary(weights: pd.DataFrame) -> dict:
    """Spread of the weights and their effective sample fraction; whether they fell back to uniform."""
    w = weights["generation1_weight"].to_numpy(dtype=np.float64)
    if len(w) == 0:
        return {"rows": 0}
    return {
        "rows": len(w),
        "weight_min": float(w.min()),
        "weight_max": float(w.max()),
        "weight_std": float(w.std()),
        "effective_sample_fraction": effective_sample_fraction(w),
        "fallback_uniform": bool(json.loads(weights["inputs"].iloc[0]).get("fallback_uniform", False)),
    }


def run_reweighting(
    store: ArtifactStore,
    units: pd.DataFrame,
    out_uri: str,
    cfg: PipelineConfig,
    fingerprint: dict,
    policy_path: str | None = None,
) -> dict:
    """Weigh `units` with cfg.reweight and write the weights stage (one shard); returns its manifest.

    For `importance`, units without the log-prob columns get them from the policy at `policy_path` and
    `reweight.behaviour_model` (`sampler`: the log-probs recorded at sampling).
    """
    if cfg.reweight.strategy == "importance" and "generation1_policy_logp" not in units.columns:
        if policy_path is None or cfg.reweight.behaviour_model is None:
            raise ValueError(
                "reweight.strategy 'importance' needs the current policy (policy_path) and "
                "reweight.behaviour_model (the model that wrote the responses)"
            )
        if cfg.reweight.uses_sampler:
            units = add_sampler_importance_inputs(units, policy_path, dtype=cfg.model.dtype,
                                                  attn_implementation=cfg.model.attn_implementation)
        else:
            units = add_importance_inputs(units, policy_path, resolve_model_path(cfg.reweight.behaviour_model),
                                          dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
    weights = SampleReweighter(cfg.reweight).weigh(units)
    table = conform(pa.Table.from_pandas(weights, preserve_index=False), WEIGHTS, "weights")
    summary = {"strategy": cfg.reweight.strategy, **weights_summary(weights)}
    log.info("weights: %s", summary)
    return store.write_stage(out_uri, "weights", fingerprint, [table], extra=summary)
