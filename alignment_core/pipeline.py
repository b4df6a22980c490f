"""The pipeline's stages as plain functions: a config and input URIs in, the stage's output URI out.

Prefect tasks (`tasks/`) are thin wrappers over these, and a notebook can call them directly. Every stage
computes a fingerprint of what it depends on (the config sections it reads, the manifests of its inputs,
the digest of the policy it runs) and returns at once when the store already holds a complete stage with
that fingerprint: the store's manifests, not Prefect's database, are the record of what is done.

Layout of one run (see alignment_core/store/):
    iter-000/eval_prompts, iter-000/examples (offline), iter-000/eval_generations (the initial policy)
    iter-k/prompts → generations → annotations → units → weights → checkpoint (+ metrics)
    iter-k/eval_generations → evaluation (win-rates against the previous and the initial policy)

Every stage runs through `run_stage` (its row in alignment_core/stages.py says what its fingerprint reads).
Modules that import torch are imported inside the stage functions that use them: the orchestrating flow imports
this module to dispatch stages, and should not pay torch's import (about 5 s) for it.
"""

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from alignment_core.adapters import adapter_base, is_adapter
from alignment_core.annotators import models_loaded_here
from alignment_core.config import PipelineConfig
from alignment_core.cpu import set_torch_threads
from alignment_core.data import DatasetLoader
from alignment_core.digests import callable_digest, data_digests, file_digest, template_digest
from alignment_core.inputs import InputRef
from alignment_core.records import METRICS, UNITS, from_rows
from alignment_core.refresh import STAGE, escalated_units, member_config, refresh_member, refreshes
from alignment_core.runner import FinishedIterationChangedError, run_stage  # noqa: F401  (the error: re-exported)
from alignment_core.stages import STAGES
from alignment_core.store import ArtifactStore, fingerprint_digest

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None] | None


def open_store(cfg: PipelineConfig) -> ArtifactStore:
    return ArtifactStore.from_config(cfg.store)


def stage_digest(store: ArtifactStore, stage_uri: str) -> str:
    """A stage output's fingerprint digest (+ its labels digest when a rerun retried some of its rows)."""
    return InputRef.stage(stage_uri).digest(store)


def resolve_model(store: ArtifactStore, name: str) -> str:
    """A local folder for a model named by hub name, local path, tiny://, or a checkpoint URI in the store."""
    return InputRef.model(name).resolve(store)


def model_input_digest(store: ArtifactStore, name: str) -> str:
    """A model's content digest (hub commit or weight bytes), as fingerprints record it: a policy, a reference, a
    reward model or a judge alike."""
    return InputRef.model(name).digest(store)


def model_lineage(store: ArtifactStore, name: str) -> dict:
    """What a checkpoint's lineage records of a model it was trained from: its name, digest, hub commit."""
    return InputRef.model(name).lineage(store)


def finished_iterations(cfg: PipelineConfig) -> int:
    """How many iterations of the run have a complete checkpoint, counting from iteration 1 without a gap."""
    store, run = open_store(cfg), cfg.store.run_name
    done = 0
    while store.checkpoint_complete(store.checkpoint_uri(run, done + 1)):
        done += 1
    return done


# ---- prompts and examples --------------------------------------------------------------------------------
def _all_prompts(cfg: PipelineConfig, loader=None) -> tuple[pa.Table, pa.Table, dict]:
    """(training prompts, held-out eval prompts, load report): eval prompts come from eval_source or the
    source's tail; the report says what the source held (format, rows kept and skipped by reason)."""
    loader = loader or DatasetLoader.from_config(cfg.data)
    prompts = loader.load_prompts()
    log.info("data: %s; %d distinct prompts", loader.report.summary(), prompts.num_rows)
    report = {**loader.report.to_dict(), "distinct_prompts": prompts.num_rows}
    if cfg.data.eval_source:
        held_out = DatasetLoader.from_config(cfg.data.model_copy(update={"source": cfg.data.eval_source}))
        eval_prompts = held_out.load_prompts().slice(0, cfg.data.eval_prompts)
        eval_ids = set(eval_prompts.column("prompt_id").to_pylist())
        keep = [pid not in eval_ids for pid in prompts.column("prompt_id").to_pylist()]
        return prompts.filter(pa.array(keep)), eval_prompts, report
    n_eval = min(cfg.data.eval_prompts, max(prompts.num_rows - 1, 0))
    return prompts.slice(0, prompts.num_rows - n_eval), prompts.slice(prompts.num_rows - n_eval), report


def load_prompts(cfg: PipelineConfig, iteration: int) -> str:
    """This iteration's prompts: a fixed permutation of the training prompts, the k-th window of it."""
    store = open_store(cfg)
    inputs = {"iteration": iteration, "per_iteration": cfg.generation.prompts_per_iteration,
              "seed": cfg.generation.seed, "data": data_digests(cfg.data)}
    return run_stage(cfg, store, STAGES["prompts"], iteration, inputs,
                     lambda out, fingerprint: _write_prompts(cfg, store, iteration, out, fingerprint))


def _write_prompts(cfg: PipelineConfig, store: ArtifactStore, iteration: int, out: str, fingerprint: dict) -> None:
    train_prompts, _, report = _all_prompts(cfg)
    if train_prompts.num_rows == 0:
        raise ValueError(f"data source {cfg.data.source!r} has no training prompts left after the held-out split")
    available, n = train_prompts.num_rows, cfg.generation.prompts_per_iteration
    first, last = (iteration - 1) * n, iteration * n  # this iteration's window of the prompt stream
    if last > available:
        message = (f"iteration {iteration} asks for prompts {first + 1}-{last} of a stream of {n} per iteration, "
                   f"but {cfg.data.source!r} has {available} training prompts")
        if cfg.data.prompt_reuse == "never":
            raise ValueError(f"{message}; add prompts, lower generation.prompts_per_iteration or iterations, "
                             "or set data.prompt_reuse: cycle to sample already used prompts again")
        log.warning("%s: reusing prompts of earlier iterations (data.prompt_reuse: cycle)%s", message,
                    f"; only {available} distinct prompts this iteration" if n > available else "")
    order = np.random.default_rng(cfg.generation.seed).permutation(available)
    window = [order[i % available] for i in range(first, last)]
    window = list(dict.fromkeys(window))  # fewer prompts than a window: no prompt twice in one iteration
    reused = max(0, last - max(first, available))  # stream positions past the end come round again
    store.write_stage(out, "prompts", fingerprint, [train_prompts.take(window)],
                      extra={"reused_prompts": reused, "report": report})


def load_eval_prompts(cfg: PipelineConfig) -> str:
    """The held-out prompts (iter-000/eval_prompts): `data.eval_source`, or the tail of the source."""
    def compute(out: str, fingerprint: dict) -> None:
        _, eval_prompts, report = _all_prompts(cfg)
        store.write_stage(out, "prompts", fingerprint, [eval_prompts], extra={"report": report})

    store = open_store(cfg)
    return run_stage(cfg, store, STAGES["eval_prompts"], 0, {"data": data_digests(cfg.data)}, compute)


def load_examples(cfg: PipelineConfig) -> str:
    """The offline dataset, normalised to EXAMPLES records (iter-000/examples), without the examples whose
    prompt is held out for evaluation: those go to iter-000/heldout_examples, never trained on."""
    def compute(out: str, fingerprint: dict) -> None:
        loader = DatasetLoader.from_config(cfg.data)
        examples = loader.load()
        _, eval_prompts, report = _all_prompts(cfg, loader)
        eval_ids = set(eval_prompts.column("prompt_id").to_pylist())
        is_heldout = pa.array([pid in eval_ids for pid in examples.column("prompt_id").to_pylist()], pa.bool_())
        heldout = store.stage_uri(cfg.store.run_name, 0, "heldout_examples")
        store.write_stage(heldout, "examples", fingerprint, [examples.filter(is_heldout)], extra={"report": report})
        store.write_stage(out, "examples", fingerprint, [examples.filter(pa.compute.invert(is_heldout))],
                          extra={"report": report, "heldout_examples": heldout})

    store = open_store(cfg)
    return run_stage(cfg, store, STAGES["examples"], 0, {"data": data_digests(cfg.data)}, compute)


def heldout_examples_uri(store: ArtifactStore, examples_uri: str) -> str:
    return store.read_manifest(examples_uri)["extra"]["heldout_examples"]


# ---- online stages ---------------------------------------------------------------------------------------
def generate(
    cfg: PipelineConfig, prompts_uri: str, policy_uri: str, iteration: int, stage: str = "generations",
    progress: Progress = None, shard_subset: tuple[int, int] | None = None, policy_iteration: int | None = None,
) -> str:
    """Sample `n_samples` responses per prompt from the policy (resumable shard by shard); `shard_subset=(i, N)`:
    only worker i of N's shards (alignment_core/fanout.py), the stage complete once the last worker is done.
    `policy_iteration`: the iteration whose checkpoint the policy is (0: the initial policy), recorded on the
    iteration's generation rows with its staleness (`scale_out.schedule`)."""
    from alignment_core.generation import run_generation

    def compute(out: str, fingerprint: dict) -> None:
        run_generation(
            store, prompts_uri, out, gen_cfg, policy_path=resolve_model(store, policy_uri), policy_uri=policy_uri,
            run_name=cfg.store.run_name, iteration=iteration, fingerprint=fingerprint, progress_callback=progress,
            tokenizer_path=cfg.model.tokenizer, dtype=cfg.model.dtype,
            attn_implementation=cfg.model.attn_implementation, shard_subset=shard_subset, sampled_from=sampled_from,
        )

    set_torch_threads(cfg.model.torch_threads)
    store = open_store(cfg)
    # Any other stage name (an experiment's own held-out samples) samples with the generation config it is given,
    # and, like the held-out samples, feeds no checkpoint.
    spec = STAGES.get(stage) or dataclasses.replace(STAGES["eval_generations"], folder=stage)
    gen_cfg = cfg.generation if stage != "eval_generations" else cfg.generation.model_copy(update={
        "n_samples": 1, "temperature": cfg.evaluation.temperature, "max_new_tokens": cfg.evaluation.max_new_tokens,
    })
    inputs = {"prompts": stage_digest(store, prompts_uri), "policy": model_input_digest(store, policy_uri)}
    sampled_from = None
    if stage == "generations" and policy_iteration is not None:
        sampled_from = {"policy_iteration": policy_iteration, "staleness": iteration - 1 - policy_iteration}
        if sampled_from["staleness"]:  # (a sync run's samples are never stale: its fingerprints stay as they were)
            inputs["sampled_from"] = sampled_from
    return run_stage(cfg, store, spec, iteration, inputs, compute, config=gen_cfg.model_dump(mode="json"))


def annotate(cfg: PipelineConfig, generations_uri: str, iteration: int,
             shard_subset: tuple[int, int] | None = None, ask: Callable | None = None,
             reward_models_uri: str | None = None) -> str:
    """Label the generations; a complete stage is redone only in its rows that failed for a transient reason
    (judge outage, timeout), unless its iteration is finished. `ask`: how a `human` annotator reaches its person
    (alignment_core/annotation/human.py; a flow passes tasks/human.py's form in the Prefect UI).
    `reward_models_uri`: the iteration's `reward_models` stage (alignment_core/refresh.py), whose fine-tuned
    members label in place of `annotation.reward_model`."""
    from alignment_core.annotation.stage import run_annotation

    set_torch_threads(cfg.model.torch_threads)
    store = open_store(cfg)
    refreshed = {}
    if reward_models_uri:
        cfg = cfg.with_reward_models(store.read_manifest(reward_models_uri)["extra"]["members"])
        refreshed = {"reward_models": stage_digest(store, reward_models_uri)}
    inputs = {"setup": cfg.setup, "generations": stage_digest(store, generations_uri),
              **annotator_digests(cfg, store), **refreshed}
    return run_stage(cfg, store, STAGES["annotations"], iteration, inputs, lambda out, fingerprint: run_annotation(
        store, generations_uri, out, cfg, fingerprint, shard_subset=shard_subset, ask=ask))


def annotator_models(cfg: PipelineConfig, store: ArtifactStore) -> dict[str, str]:
    """Digests of the models an annotator runs: a model retrained at the same path changes the labels."""
    return {field.removeprefix("annotation."): model_input_digest(store, name)
            for field, name in models_loaded_here(cfg.annotation).items()}


def annotator_digests(cfg: PipelineConfig, store: ArtifactStore) -> dict[str, str]:
    """Everything an annotator reads besides its config: its models, the judge template's text, the reward
    function's code."""
    annotation, digests = cfg.annotation, annotator_models(cfg, store)
    if "programmatic" in annotation.kinds:
        digests["programmatic"] = callable_digest(annotation.programmatic)
    if annotation.judge_kind:
        suffix = f"_{annotation.judge.pointwise_scale}" if annotation.judge_kind == "judge_pointwise" else ""
        digests["template"] = template_digest(annotation.judge.template, suffix)
    return digests


def build_units(
    cfg: PipelineConfig, iteration: int, *, examples_uri: str | None = None,
    generations_uri: str | None = None, annotations_uri: str | None = None,
) -> str:
    """The training units of this round: dataset examples (offline) or annotated generations (online)."""
    from alignment_core.batches import units_from_examples, units_from_online

    def compute(out: str, fingerprint: dict) -> None:
        if examples_uri:
            units = units_from_examples(store.read_pandas(examples_uri), cfg.setup)
        else:
            units = units_from_online(store.read_pandas(generations_uri), store.read_pandas(annotations_uri),
                                      cfg.setup)
        if len(units):
            store.write_stage(out, "units", fingerprint, [pa.Table.from_pandas(units, preserve_index=False)])
            return
        message = (f"iteration {iteration}: no usable training units (setup {cfg.setup}); see the "
                   "annotation stage's status counts")
        if not cfg.online:
            raise ValueError(message)
        # Online, an iteration whose samples all tied (or failed) carries the policy over unchanged (see
        # `train`); the empty stage and its note keep that visible instead of stopping a scheduled run.
        log.warning("%s: the policy is carried over unchanged", message)
        store.write_stage(out, "units", fingerprint, [], extra={"note": message})

    store = open_store(cfg)
    sources = [uri for uri in (examples_uri, generations_uri, annotations_uri) if uri]
    inputs = {"setup": cfg.setup, "sources": [stage_digest(store, uri) for uri in sources]}
    return run_stage(cfg, store, STAGES["units"], iteration, inputs, compute)


def reweight(cfg: PipelineConfig, units_uri: str, policy_uri: str, iteration: int) -> str:
    """Per-unit training weights (`reweight.strategy`); `importance` reads the policy's log-probs."""
    from alignment_core.reweight import run_reweighting

    def compute(out: str, fingerprint: dict) -> None:
        units = store.read_pandas(units_uri)
        if len(units) == 0:
            store.write_stage(out, "weights", fingerprint, [], extra={"note": "no units to weigh"})
        else:
            run_reweighting(store, units, out, cfg, fingerprint, policy_path=resolve_model(store, policy_uri))

    set_torch_threads(cfg.model.torch_threads)
    store = open_store(cfg)
    inputs = {"units": stage_digest(store, units_uri)}
    if cfg.reweight.strategy == "importance":
        inputs["policy"] = model_input_digest(store, policy_uri)
        if not cfg.reweight.uses_sampler:  # (else the units carry the sampler's log-probs and digest)
            inputs["behaviour"] = model_input_digest(store, cfg.reweight.behaviour_model)
    return run_stage(cfg, store, STAGES["weights"], iteration, inputs, compute)


def train(
    cfg: PipelineConfig, units_uri: str, weights_uri: str, policy_uri: str, reference_uri: str, iteration: int,
    progress: Callable[[int, int, dict], None] | None = None,
) -> str:
    """One training round; returns the checkpoint URI (skipped when a checkpoint of the same inputs exists)."""
    from alignment_core.training import Trainer
    from alignment_core.training.rounds import carry_over, launch_distributed_round

    def compute(checkpoint: str, fingerprint: dict) -> None:
        metrics = store.stage_uri(cfg.store.run_name, iteration, "metrics")
        if store.read_manifest(units_uri)["rows"] == 0:
            carry_over(cfg, store, policy_path, checkpoint, metrics, fingerprint, policy_uri=policy_uri)
        elif (cfg.training.num_processes or 1) > 1 or cfg.training.accelerate_config:
            launch_distributed_round(cfg, units_uri, weights_uri, policy_path, reference_path, checkpoint, metrics,
                                     policy_uri=policy_uri, fingerprint=fingerprint_digest(fingerprint))
        else:
            trainer = Trainer(cfg, policy_path=policy_path, tokenizer_path=cfg.model.tokenizer, store=store,
                              reference_path=reference_path, policy_name=policy_uri)
            encoded = trainer.batch_factory.encode(store.read_pandas(units_uri), store.read_pandas(weights_uri))
            try:
                # The round's fingerprint is the lineage's: one fingerprint decides whether the round is done, and
                # the Trainer resumes only a checkpoint written for it.
                trainer.train(encoded, checkpoint, metrics, progress_callback=progress,
                              fingerprint=fingerprint_digest(fingerprint))
            finally:
                trainer.release()
        models = {"policy": policy.lineage(store, policy_path), "reference": reference.lineage(store, reference_path)}
        trained = store.local_checkpoint(checkpoint)
        if is_adapter(trained):  # a LoRA checkpoint: its base by config name and digest
            models["adapter_base"] = model_lineage(store, adapter_base(trained))
        store.write_json(f"{checkpoint}/lineage.json", {
            "fingerprint": fingerprint, "policy_uri": policy_uri, "reference_uri": reference_uri,
            "units_uri": units_uri, "models": models, "seed": cfg.training.seed,
            "bootstrap_seed": cfg.training.bootstrap_seed})

    set_torch_threads(cfg.model.torch_threads)
    store = open_store(cfg)
    policy, reference = InputRef.model(policy_uri), InputRef.model(reference_uri)
    policy_path, reference_path = policy.resolve(store), reference.resolve(store)  # once: digests and lineage
    # The accelerate config file by its bytes: its num_processes (when training.num_processes is unset) and its
    # strategy decide the round as much as the training section does.
    accelerate = ({"accelerate_config": "sha256:" + file_digest(cfg.training.accelerate_config)}
                  if cfg.training.accelerate_config else {})
    inputs = {"setup": cfg.setup, "units": stage_digest(store, units_uri), "weights": stage_digest(store, weights_uri),
              "policy": policy.digest(store, policy_path), "reference": reference.digest(store, reference_path),
              **accelerate}
    return run_stage(cfg, store, STAGES["checkpoint"], iteration, inputs, compute,
                     out=store.checkpoint_uri(cfg.store.run_name, iteration))


def refresh_reward_models(cfg: PipelineConfig, iteration: int) -> str:
    """The `reward_models` stage of `iteration` (>= 2): every member fine-tuned on the escalated labels of the
    iterations before it (alignment_core/refresh.py); returns the stage URI, whose manifest lists the members
    (`extra.members`)."""
    if not refreshes(cfg, iteration):
        raise ValueError(f"iteration {iteration}: no reward-model refresh (annotation.cascade.refresh.enabled, "
                         "a cascade, and an iteration after the first)")
    def compute(out: str, fingerprint: dict) -> None:
        units, counts = escalated_units(store, run, earlier)
        writer = store.stage_writer(out, "units", fingerprint)  # clears members trained for another fingerprint
        if len(units) == 0:
            log.warning("%s: no escalated labels in iterations 1-%d; the original reward models label", out,
                        iteration - 1)
            members = list(originals)
        else:
            members = [refresh_member(cfg, store, out, index, name, units, fingerprint)
                       for index, name in enumerate(originals)]
        writer.write_shard(0, from_rows(units.to_dict("records"), UNITS, f"{STAGE} units"))
        writer.finish({"members": members, "originals": list(originals), "labels": len(units),
                       "labels_by_iteration": counts, "bootstrap": cfg.annotation.cascade.refresh.bootstrap})

    store, run = open_store(cfg), cfg.store.run_name
    originals = cfg.annotation.reward_models
    earlier = range(1, iteration)
    inputs = {"labels": [stage_digest(store, store.stage_uri(run, k, "annotations")) for k in earlier],
              "members": [model_input_digest(store, name) for name in originals],
              "rounds": [member_config(cfg, i).stage_hash("training", "model") for i in range(len(originals))]}
    return run_stage(cfg, store, STAGES[STAGE], iteration, inputs, compute)


# ---- evaluation ------------------------------------------------------------------------------------------
def evaluate(
    cfg: PipelineConfig, eval_prompts_uri: str, policy_uri: str, previous_policy_uri: str,
    initial_policy_uri: str, iteration: int,
) -> str:
    """Held-out prompts: the new policy against the previous and the initial one, judged by the annotator. The
    three `eval_generations` stages (iteration 0 holds the initial policy's), then `evaluate_generations`."""
    new = generate(cfg, eval_prompts_uri, policy_uri, iteration, stage="eval_generations")
    previous = generate(cfg, eval_prompts_uri, previous_policy_uri, iteration - 1, stage="eval_generations")
    initial = generate(cfg, eval_prompts_uri, initial_policy_uri, 0, stage="eval_generations")
    return evaluate_generations(cfg, new, previous, initial, iteration)


def evaluate_generations(cfg: PipelineConfig, new_uri: str, previous_uri: str, initial_uri: str,
                         iteration: int) -> str:
    """The `evaluation` metrics stage: the new policy's held-out samples against the previous and the initial
    policy's, as win-rates with 95% Wilson intervals and the mean reward of each policy."""
    from alignment_core.evaluation import annotator_label, score_evaluation

    def compute(out: str, fingerprint: dict) -> None:
        new = store.read_pandas(new_uri)
        summary = score_evaluation(cfg, new, {"previous": store.read_pandas(previous_uri),
                                              "initial": store.read_pandas(initial_uri)})
        rows = [{"step": iteration, "split": "eval", "metric": k, "value": v} for k, v in summary.items()]
        store.write_stage(out, "metrics", fingerprint, [from_rows(rows, METRICS)],
                          extra={"summary": summary, "judge": annotator_label(cfg), "oracle": cfg.evaluation.oracle})

    set_torch_threads(cfg.model.torch_threads)
    store = open_store(cfg)
    oracle = {"oracle": callable_digest(cfg.evaluation.oracle)} if cfg.evaluation.oracle else {}
    inputs = {"new": stage_digest(store, new_uri), "previous": stage_digest(store, previous_uri),
              "initial": stage_digest(store, initial_uri), **annotator_digests(cfg, store), **oracle}
    return run_stage(cfg, store, STAGES["evaluation"], iteration, inputs, compute)


def evaluate_reward_model(cfg: PipelineConfig, heldout_uri: str, checkpoint_uri: str, iteration: int) -> str:
    """A trained reward model on preference pairs of held-out prompts: how often it scores the chosen
    response above the rejected one (ties count half), with a 95% Wilson interval."""
    from alignment_core.evaluation import reward_model_accuracy

    def compute(out: str, fingerprint: dict) -> None:
        summary = reward_model_accuracy(store.read_pandas(heldout_uri), resolve_model(store, checkpoint_uri),
                                        cfg, out)
        rows = [{"step": iteration, "split": "eval", "metric": k, "value": v} for k, v in summary.items()]
        store.write_stage(out, "metrics", fingerprint, [from_rows(rows, METRICS)],
                          extra={"summary": summary, "judge": "held-out preference pairs"})

    store = open_store(cfg)
    inputs = {"pairs": stage_digest(store, heldout_uri), "reward_model": model_input_digest(store, checkpoint_uri)}
    return run_stage(cfg, store, STAGES["reward_model_evaluation"], iteration, inputs, compute)


def evaluation_summary(store: ArtifactStore, evaluation_uri: str) -> dict:
    """The evaluation's numbers, and who judged them: `judge` (the annotator in words) and `oracle` (a
    module:function) where the stage recorded them, for the verdict line (alignment_core/verdict.py)."""
    extra = store.read_manifest(evaluation_uri)["extra"]
    return {**extra["summary"], **{k: extra[k] for k in ("judge", "oracle") if extra.get(k)}}


def stage_summary(store: ArtifactStore, stage_uri: str) -> dict:
    """Row count and the stage's own statistics (manifest extra), for reports."""
    manifest = store.read_manifest(stage_uri) or {}
    return {"uri": stage_uri, "rows": manifest.get("rows"), **manifest.get("extra", {})}


def expensive_labels_spent(store: ArtifactStore, run: str, through: int) -> int:
    """A cascade's expensive labels (its escalated rows) in iterations 1..`through` of a run: the label budget
    spent so far, from each iteration's annotations manifest."""
    return sum(stage_summary(store, store.stage_uri(run, k, "annotations")).get("escalated", 0)
               for k in range(1, through + 1))


def training_summary(store: ArtifactStore, metrics_uri: str) -> dict:
    """Last value of each training metric of a round."""
    if store.read_manifest(metrics_uri) is None:
        return {}
    frame: pd.DataFrame = store.read_pandas(metrics_uri)
    frame = frame[frame["split"] == "train"].sort_values("step")
    return {metric: float(group["value"].iloc[-1]) for metric, group in frame.groupby("metric")}
