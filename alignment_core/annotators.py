"""The annotator table: one row per `annotation.annotator` kind, as `losses.LOSSES` is for losses.

A row says how to build the annotator from the config, which models it loads in this process (the names,
by the config field that holds them: preflight checks them, fingerprints digest them, and a stage that
loads one takes a GPU slot), whether it labels only pairs, and how a summary names it. Preflight, GPU
dispatch (tasks/dispatch.py), the annotate stage, the pipeline's fingerprints and evaluation all read it.

Add an annotator: a class with `annotate(generations) -> rows` (annotation/base.py's `Annotator`) in a
module of alignment_core/annotation/, one row here, and its name in `AnnotationConfig.annotator`'s choices
(tests/test_annotators.py checks the two agree and runs every row).

The annotators' modules are imported by the rows' `build` only: this table is read before any model library
is imported (preflight's quick checks, the orchestrating flow's GPU dispatch).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from alignment_core.config import AnnotationConfig, PipelineConfig

# build(cfg, rules, ask) -> an Annotator; rules: annotation/base.py's ScoreRules, ask: annotation/human.py's Ask
Build = Callable[[PipelineConfig, Any, Any], Any]


def _no_models(annotation: AnnotationConfig) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class AnnotatorKind:
    name: str
    build: Build
    describe: Callable[[AnnotationConfig], str]  # who labels, in words (plots and summaries)
    models: Callable[[AnnotationConfig], dict[str, str]] = field(default=_no_models)  # config field -> model
    pairs_only: bool = False  # labels two responses against each other; no pointwise scores


def _reward_models(annotation: AnnotationConfig) -> dict[str, str]:
    members = annotation.reward_models
    return {"annotation.reward_model" + (f"[{i}]" if len(members) > 1 else ""): name for i, name in enumerate(members)}


def _judge_model(annotation: AnnotationConfig) -> dict[str, str]:
    """A judge run here (transformers or vLLM); an HTTP judge runs elsewhere."""
    return {} if annotation.judge.backend == "http" else {"annotation.judge.model": annotation.judge.model}


def _describe_judge(annotation: AnnotationConfig) -> str:
    judge = annotation.judge
    return f"LLM judge {judge.model} ({judge.backend}, template {judge.template})"


def _build_programmatic(cfg: PipelineConfig, rules, ask):
    from alignment_core.annotation.scorers import ProgrammaticAnnotator

    return ProgrammaticAnnotator(cfg.annotation.programmatic, rules)


def _build_reward_model(cfg: PipelineConfig, rules, ask):
    from alignment_core.annotation.scorers import RewardModelAnnotator, RewardModelEnsemble

    annotation = cfg.annotation
    options = {"batch_size": annotation.batch_size, "max_length": cfg.training.max_length,
               "dtype": annotation.dtype or cfg.model.dtype}
    if len(annotation.reward_models) > 1:
        return RewardModelEnsemble(annotation.reward_models, rules, annotation.ensemble_penalty,
                                   annotation.max_disagreement, **options)
    return RewardModelAnnotator(annotation.reward_model, rules, **options)


def _build_pairwise_judge(cfg: PipelineConfig, rules, ask):
    from alignment_core.annotation.judge import PairwiseJudgeAnnotator, load_template, make_judge_backend

    judge = cfg.annotation.judge
    return PairwiseJudgeAnnotator(make_judge_backend(cfg), load_template(judge.template),
                                  both_orders=judge.both_orders, on_disagreement=judge.on_disagreement)


def _build_pointwise_judge(cfg: PipelineConfig, rules, ask):
    from alignment_core.annotation.judge import PointwiseJudgeAnnotator, load_template, make_judge_backend

    judge = cfg.annotation.judge
    return PointwiseJudgeAnnotator(make_judge_backend(cfg), load_template(judge.template,
                                                                          suffix=f"_{judge.pointwise_scale}"),
                                   rules, judge.pointwise_scale)


def _build_human(cfg: PipelineConfig, rules, ask):
    from alignment_core.annotation.human import HumanAnnotator

    return HumanAnnotator(ask, cfg.annotation.human.max_pairs_per_form)


ANNOTATORS: dict[str, AnnotatorKind] = {kind.name: kind for kind in (
    AnnotatorKind("programmatic", _build_programmatic, describe=lambda a: f"rule {a.programmatic}"),
    AnnotatorKind("reward_model", _build_reward_model, describe=lambda a: f"reward model {a.reward_model}",
                  models=_reward_models),
    AnnotatorKind("judge_pairwise", _build_pairwise_judge, describe=_describe_judge, models=_judge_model,
                  pairs_only=True),
    AnnotatorKind("judge_pointwise", _build_pointwise_judge, describe=_describe_judge, models=_judge_model),
    AnnotatorKind("human", _build_human, describe=lambda a: "a person (the Prefect UI's form)", pairs_only=True),
)}


def models_loaded_here(annotation: AnnotationConfig) -> dict[str, str]:
    """The models the configured annotator (a cascade: both of its annotators) loads in this process, by the
    config field that names them."""
    return {name: model for kind in annotation.kinds for name, model in ANNOTATORS[kind].models(annotation).items()}
