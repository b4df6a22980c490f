"""Explicit, versioned Arrow schemas of every artifact table the pipeline writes.

Every stage writes one of these tables as Parquet shards. `conform` checks a table against its schema
before it is written, so a wrong column fails with the column's name instead of landing on disk.
Bump `SCHEMA_VERSION` when a schema changes incompatibly; manifests record it.
"""

import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 1

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# One normalised dataset row (DatasetLoader output). Which response columns are filled depends on the
# format: chosen/rejected for pairs, completion (+ label for pointwise feedback) for SFT and KTO data.
EXAMPLES = pa.schema(
    [
        pa.field("example_id", pa.string(), nullable=False),  # hash of (prompt_id, responses): stable row id
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),  # the prompt as plain text (for display and hashing)
        pa.field("prompt_messages", pa.list_(MESSAGE), nullable=False),  # the prompt as chat turns
        pa.field("chosen", pa.string()),
        pa.field("rejected", pa.string()),
        pa.field("chosen_score", pa.float64()),
        pa.field("rejected_score", pa.float64()),
        pa.field("completion", pa.string()),
        pa.field("label", pa.float64()),  # pointwise feedback: 1.0 desirable, 0.0 undesirable
        pa.field("source_row", pa.int64(), nullable=False),  # row index in the source dataset
    ]
)

# Prompts for one iteration (load_prompts stage).
PROMPTS = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("prompt_messages", pa.list_(MESSAGE), nullable=False),
    ]
)

# One sampled response per row (generate stage), with its lineage.
GENERATIONS = pa.schema(
    [
        pa.field("generation_id", pa.string(), nullable=False),  # hash of (prompt_id, policy digest, seed, index)
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("prompt_messages", pa.list_(MESSAGE), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("response_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("token_logprobs", pa.list_(pa.float32())),  # per-token log-prob under the sampling policy
        pa.field("sum_logprob", pa.float64()),
        pa.field("finish_reason", pa.string(), nullable=False),  # "stop" (EOS) or "length"
        pa.field("policy_uri", pa.string(), nullable=False),
        pa.field("policy_digest", pa.string(), nullable=False),
        pa.field("sampling_params", pa.string(), nullable=False),  # JSON
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("backend", pa.string(), nullable=False),  # "transformers" or "vllm"
        # The iteration whose checkpoint sampled the row (0: the initial policy), and how many checkpoints the
        # policy that trains on it is ahead of that one (scale_out.schedule: async); null for a model named by
        # path or id (held-out samples of an evaluation, an experiment's behaviour model).
        pa.field("policy_iteration", pa.int32()),
        pa.field("staleness", pa.int32()),
    ]
)

# One labelled training unit per row (annotate stage). Pairwise rows fill both generations; pointwise rows
# only generation1. Rewards: for pairwise feedback generation1_reward is 1.0 when generation1
# is preferred (0.5 on a tie); for pointwise feedback it is the label (1.0 desirable / 0.0 undesirable) or the
# scalar reward (RL). Raw annotator output is kept verbatim; failed verdicts stay as rows with a status.
ANNOTATIONS = pa.schema(
    [
        pa.field("annotation_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("annotator", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # "pairwise" or "pointwise"
        pa.field("generation1_id", pa.string(), nullable=False),
        pa.field("generation2_id", pa.string()),
        pa.field("generation1_reward", pa.float64()),
        pa.field("generation2_reward", pa.float64()),
        pa.field("score1", pa.float64()),  # the annotator's raw score of generation1 (RM score, judge prob)
        pa.field("score2", pa.float64()),
        # judge: log-prob gap or agreement; ensemble: the fraction of members that rank the pair so; else null
        pa.field("confidence", pa.float64()),
        pa.field("agreement", pa.bool_()),  # both judge orders (every ensemble member) agreed; else null
        # "ok", "tie" (labels); "skipped", "abstained", "unparseable", "error" (no label)
        pa.field("status", pa.string(), nullable=False),
        pa.field("raw", pa.string(), nullable=False),  # JSON of the annotator's raw outputs
    ]
)

# The training unit every setup shares: one prompt with one or two responses and their rewards, in the
# vocabulary of the training batch. Built from dataset examples (offline: unit_id = example_id) or from
# generations joined with annotations (online: unit_id = annotation_id); see alignment_core.batches.
UNITS = pa.schema(
    [
        pa.field("unit_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("prompt_messages", pa.list_(MESSAGE), nullable=False),
        pa.field("generation1_response", pa.string(), nullable=False),
        pa.field("generation2_response", pa.string()),
        pa.field("generation1_reward", pa.float64()),
        pa.field("generation2_reward", pa.float64()),
        pa.field("generation1_id", pa.string()),  # online: the generation rows the responses came from
        pa.field("generation2_id", pa.string()),
        # online: the sampled response tokens (the stop token included where the sample stopped), which training
        # learns as they are; offline units have none and their text is tokenised
        pa.field("generation1_token_ids", pa.list_(pa.int32())),
        pa.field("generation2_token_ids", pa.list_(pa.int32())),
        # online: the summed raw log-prob of each response's tokens under the model that sampled it, and that
        # model's digest; the Trainer uses them as reference log-probs when the reference is that model
        pa.field("generation1_sampler_logp", pa.float64()),
        pa.field("generation2_sampler_logp", pa.float64()),
        pa.field("generation1_sampler_digest", pa.string()),
        pa.field("generation2_sampler_digest", pa.string()),
        pa.field("score1", pa.float64()),  # online: the annotator's raw scores of the two generations
        pa.field("score2", pa.float64()),
        pa.field("confidence", pa.float64()),
        pa.field("agreement", pa.bool_()),
    ]
)

# Per-sample weights (reweight stage), one row per unit, with the inputs the strategy used.
WEIGHTS = pa.schema(
    [
        pa.field("unit_id", pa.string(), nullable=False),
        pa.field("strategy", pa.string(), nullable=False),
        pa.field("generation1_weight", pa.float64(), nullable=False),
        pa.field("generation2_weight", pa.float64()),
        pa.field("inputs", pa.string(), nullable=False),  # JSON of the per-row quantities the weight came from
    ]
)

# Long-format metrics (training and evaluation): one value per row.
METRICS = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # "train" or "eval"
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "examples": EXAMPLES,
    "prompts": PROMPTS,
    "generations": GENERATIONS,
    "annotations": ANNOTATIONS,
    "units": UNITS,
    "weights": WEIGHTS,
    "metrics": METRICS,
}


class SchemaError(ValueError):
    """A table does not match the schema it is written as."""


def conform(table: pa.Table, schema: pa.Schema, name: str = "table") -> pa.Table:
    """Return `table` cast to `schema`, or raise SchemaError naming the offending column.

    Columns are reordered to the schema's order; missing nullable columns are filled with nulls;
    extra columns, missing required columns, uncastable types and nulls in non-nullable columns fail.
    """
    extra = [c for c in table.column_names if c not in schema.names]
    if extra:
        raise SchemaError(f"{name}: unexpected column {extra[0]!r} (schema has {schema.names})")
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise SchemaError(f"{name}: missing required column {field.name!r}")
            columns.append(pa.nulls(table.num_rows, type=field.type))
            continue
        column = table.column(field.name)
        if pa.types.is_integer(field.type) and pa.types.is_floating(column.type):
            # pandas holds an integer column with nulls as floats, NaN for null (a stage read back and written)
            column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
        if not field.nullable and column.null_count:
            raise SchemaError(f"{name}: column {field.name!r} has {column.null_count} null values")
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise SchemaError(
                f"{name}: column {field.name!r} has type {column.type}, expected {field.type}: {error}"
            ) from error
    return pa.Table.from_arrays(columns, schema=schema)


def from_rows(rows: list[dict], schema: pa.Schema, name: str = "table") -> pa.Table:
    """Build a conforming table from a list of dicts (missing keys become nulls)."""
    if not rows:
        return schema.empty_table()
    keys = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.Table.from_pydict({k: [row.get(k) for row in rows] for k in keys})
    return conform(table, schema, name)
