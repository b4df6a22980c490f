"""A person labels pairs through a form on the paused flow run, in the Prefect UI.

`ask_in_the_ui` is the `ask` of alignment_core/annotation/human.py's HumanAnnotator inside a flow run: it pauses
the run with Prefect's pause-with-input (`pause_flow_run(wait_for_input=<form>)`); the UI shows the paused run
with a "Resume" form, one choice per pair (its prompt and both responses in the field's description), and a
field for the labeller's name; submitting it resumes the run with the answers. A client answers the same form
through the API: `prefect.flow_runs.resume_flow_run(flow_run_id, run_input={"pair_1": "first", ...})`.

Where it pauses: inside the annotate task (or the annotate-stage flow of a deployment). Prefect 3.9's
`pause_flow_run` reads the flow run from `FlowRunContext`, which a task run keeps, and pauses the whole flow run
while the task waits, blocking in its process (no `reschedule`: the annotator's state stays in memory).

The timeout: Prefect fails a paused run that is not resumed by the pause's timeout. So that a person who is
away costs unanswered pairs, not the run, the form's own deadline (`annotation.human.timeout_s`) resumes the run
with no answers, and Prefect's pause timeout is set `GRACE_S` later, a backstop that is never reached while
this process runs.
"""

import contextvars
import functools
import threading
import time
from datetime import UTC, datetime
from uuid import UUID, uuid4

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import NotPausedError
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import Field, create_model

from alignment_core.annotation.human import Ask, Choice, FormAnswers, HumanPair
from alignment_core.config import PipelineConfig

POLL_S = 2  # how often the paused run asks the API whether it was resumed
GRACE_S = 60  # Prefect's own pause timeout, after the form's deadline


class PairLabels(RunInput):
    """The labelling form: `pair_1`, `pair_2`, ... (one per pair, added by `labels_form`) and the labeller."""

    labeller: str | None = Field(default=None, title="Your name", description=(
        "Recorded with each label (the Prefect API does not say who resumed a run). Optional."))


def labels_form(pairs: list[HumanPair], timeout_s: int) -> type[PairLabels]:
    """A PairLabels form with one optional choice per pair, the pair's text in the field's description."""
    fields = {
        f"pair_{number}": (Choice | None, Field(
            default=None, title=f"Pair {number} of {len(pairs)}",
            description=f"PROMPT:\n{pair.prompt}\n\nFIRST:\n{pair.first}\n\nSECOND:\n{pair.second}",
            json_schema_extra={"pair_key": pair.key}))
        for number, pair in enumerate(pairs, 1)
    }
    form = create_model("PairLabels", __base__=PairLabels, **fields)
    form._description = (
        f"**Label {len(pairs)} pairs.** For each pair, which response answers its prompt better: `first`, "
        "`second`, `tie` (equally good) or `skip` (you cannot judge it). Pairs left empty are recorded as "
        f"unanswered, and no pair you skip or leave empty is trained on. Without an answer within {timeout_s} s, "
        "the run goes on with these pairs unanswered.")
    return form


class _FormDeadline:
    """Resumes the paused run with no answers once `timeout_s` has passed without an answer (`closed` then)."""

    def __init__(self, flow_run_id: UUID, timeout_s: float):
        self.flow_run_id, self.timeout_s = flow_run_id, timeout_s
        self.answered, self.closed = threading.Event(), False
        # The thread sees this run's Prefect settings (the API URL of an ephemeral server lives in a context).
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._close_when_due,),
                                       daemon=True, name="human-form-deadline")

    def _close_when_due(self) -> None:
        if self.answered.wait(self.timeout_s):
            return
        while not self.answered.is_set():
            try:
                resume_flow_run(self.flow_run_id, run_input={})
                self.closed = True
                return
            except NotPausedError:  # answered this very moment (or not paused yet): look again
                self.answered.wait(0.2)

    def __enter__(self) -> "_FormDeadline":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.answered.set()
        self.thread.join()


def ask_in_the_ui(pairs: list[HumanPair], timeout_s: int) -> FormAnswers:
    """Pause this flow run with a form for `pairs`; the answers once it is resumed, or none at `timeout_s`."""
    context = FlowRunContext.get()
    if context is None:
        raise RuntimeError("the human annotator's form pauses a flow run: call it inside a Prefect flow run")
    logger = get_run_logger()
    form = labels_form(pairs, timeout_s)
    logger.info("waiting up to %d s for a person to label %d pairs: the paused flow run %s has the form (Resume) "
                "in the Prefect UI%s", timeout_s, len(pairs), context.flow_run.name,
                f", {flow_run.ui_url}" if flow_run.ui_url else "")
    opened = time.monotonic()
    with _FormDeadline(context.flow_run.id, timeout_s) as deadline:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout_s + GRACE_S, poll_interval=POLL_S,
                                key=f"human-labels-{uuid4().hex}")
    seconds_open = time.monotonic() - opened
    choices = {pair.key: getattr(answer, f"pair_{number}") for number, pair in enumerate(pairs, 1)}
    answered = sum(choice is not None for choice in choices.values())
    logger.info("the form %s after %.0f s: %d of %d pairs answered", "timed out" if deadline.closed else "came back",
                seconds_open, answered, len(pairs))
    return FormAnswers(choices=choices, labeller=answer.labeller or "unknown", timed_out=deadline.closed,
                       answered_at=datetime.now(UTC).isoformat(timespec="seconds"), seconds_open=seconds_open)


def form_in_the_ui(cfg: PipelineConfig) -> Ask:
    """The `ask` a stage run in a flow gives its human annotator, with the config's form timeout."""
    return functools.partial(ask_in_the_ui, timeout_s=cfg.annotation.human.timeout_s)
