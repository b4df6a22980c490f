"""Annotators: generation rows in, annotation rows (records.ANNOTATIONS) out.

base.py      the Annotator protocol, row statuses, scores -> pairs / pointwise rows (shared)
scorers.py   reward model (its own tokenizer), reward-model ensemble and programmatic (`module:function`) annotators
judge.py     LLM judge, pairwise (both orders) and pointwise; Jinja templates in templates/
backends.py  judge backends: a local causal LM, an OpenAI-compatible HTTP endpoint
cascade.py   a cheap annotator on every pair, a budget of the least sure ones escalated to an expensive one
human.py     a person, through an injected `ask` (in a flow: a form on the paused run, tasks/human.py)
stage.py     make_annotator(cfg) and run_annotation(...): the resumable annotate stage
"""

import importlib

# Each public name and the module that defines it, imported on first use (PEP 562): a flow imports this package
# for the human annotator's form types, and should not pay for torch and transformers (about 4 s, which the
# reward-model and judge modules import) before its Prefect server has even started.
_MODULE_OF = {
    "HttpJudgeBackend": "backends", "JudgeReply": "backends", "LocalJudgeBackend": "backends",
    "VLLMJudgeBackend": "backends",
    "FAILURE_STATUSES": "base", "LABEL_STATUSES": "base", "AnnotationFailureError": "base", "Annotator": "base",
    "Score": "base", "ScoreRules": "base", "rows_from_scores": "base", "select_pairs": "base",
    "PairwiseJudgeAnnotator": "judge", "PointwiseJudgeAnnotator": "judge", "load_template": "judge",
    "ProgrammaticAnnotator": "scorers", "RewardModelAnnotator": "scorers", "RewardModelEnsemble": "scorers",
    "import_callable": "scorers",
    "annotation_summary": "stage", "make_annotator": "stage", "run_annotation": "stage",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
