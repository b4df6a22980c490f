"""Annotators: generation rows in, annotation rows (records.ANNOTATIONS) out.

base.py      the Annotator protocol, row statuses, scores -> pairs / pointwise rows (shared)
scorers.py   reward model (its own tokenizer), reward-model ensemble and programmatic (`module:function`) annotators
judge.py     LLM judge, pairwise (both orders) and pointwise; Jinja templates in templates/
backends.py  judge backends: a local causal LM, an OpenAI-compatible HTTP endpoint
cascade.py   a cheap annotator on every pair, a budget of the least sure ones escalated to an expensive one
human.py     a person, through an injected `ask` (in a flow: a form on the paused run, tasks/human.py)
stage.py     make_annotator(cfg) and run_annotation(...): the resumable annotate stage
"""

from alignment_core.annotation.backends import HttpJudgeBackend, JudgeReply, LocalJudgeBackend, VLLMJudgeBackend
from alignment_core.annotation.base import (
    FAILURE_STATUSES,
    LABEL_STATUSES,
    AnnotationFailureError,
    Annotator,
    Score,
    ScoreRules,
    rows_from_scores,
    select_pairs,
)
from alignment_core.annotation.judge import PairwiseJudgeAnnotator, PointwiseJudgeAnnotator, load_template
from alignment_core.annotation.scorers import (
    ProgrammaticAnnotator,
    RewardModelAnnotator,
    RewardModelEnsemble,
    import_callable,
)
from alignment_core.annotation.stage import annotation_summary, make_annotator, run_annotation

__all__ = [
    "FAILURE_STATUSES",
    "LABEL_STATUSES",
    "AnnotationFailureError",
    "Annotator",
    "HttpJudgeBackend",
    "JudgeReply",
    "LocalJudgeBackend",
    "VLLMJudgeBackend",
    "PairwiseJudgeAnnotator",
    "PointwiseJudgeAnnotator",
    "ProgrammaticAnnotator",
    "RewardModelAnnotator",
    "RewardModelEnsemble",
    "Score",
    "ScoreRules",
    "annotation_summary",
    "import_callable",
    "load_template",
    "make_annotator",
    "rows_from_scores",
    "run_annotation",
    "select_pairs",
]
