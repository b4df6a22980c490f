"""An LLM as annotator: pairwise ("which of A and B is better?") and pointwise (yes/no, or 1-10).

A verdict is read from the answer tokens' next-token log-probs when the backend gives both options (the
confidence is then the log-prob gap), else from the answer text by a strict parser: exactly one clear
answer, or the verdict is "unparseable". Nothing is ever guessed.

Pairwise, the judge sees each pair in both orders (A/B swapped) to cancel position bias. Agreeing orders
give a label; disagreeing orders give a tie (0.5/0.5) or a "dropped" row, per judge.on_disagreement.
"""

import hashlib
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import jinja2
import jinja2.sandbox
import pandas as pd

from alignment_core.annotation.backends import (
    HttpJudgeBackend,
    JudgeBackend,
    JudgeReply,
    LocalJudgeBackend,
    VLLMJudgeBackend,
    is_logprob,
)
from alignment_core.annotation.base import Score, ScoreRules, annotation_row, prompt_groups, rows_from_scores
from alignment_core.config import PipelineConfig

TEMPLATE_DIR = Path(__file__).parent / "templates"
PAIRWISE_OPTIONS = {"A": ["A"], "B": ["B"]}
YES_NO_OPTIONS = {"yes": ["yes", "Yes", "YES"], "no": ["no", "No", "NO"]}


# ---- templates -----------------------------------------------------------------------------------------
# A template is written by whoever sets the config. The sandbox keeps it from Python's internals; these bounds
# keep it from the CPU and memory (nested loops, a huge repetition): a render past one fails, naming the template.
TEMPLATE_MAX_RANGE = 10_000  # items one range() may give
TEMPLATE_MAX_CHARS = 1_000_000  # characters of the rendered prompt, and of one repeated string or list
TEMPLATE_DEADLINE_S = 2.0  # seconds one render may take (a bundled template renders in about a millisecond)


class TemplateBoundError(ValueError):
    """A judge template's render went past its range, size or time bound."""


class _BoundedSandbox(jinja2.sandbox.SandboxedEnvironment):
    """The sandbox with range() capped and checking the render's deadline on every item, and `*` / `**` checked
    before they build a huge string, list or number. Loops over range() are where a template spends CPU without
    output; the output itself is checked by JudgeTemplate.render as it is produced."""

    intercepted_binops = frozenset(["*", "**"])

    def __init__(self, template: str):
        super().__init__(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
        self.template, self.deadline = template, time.monotonic() + TEMPLATE_DEADLINE_S
        self.globals["range"] = self.bounded_range

    def exceeded(self, what: str) -> TemplateBoundError:
        return TemplateBoundError(f"judge template {self.template} {what}; refused (a judge template renders one "
                                  "prompt: it needs no large loops or repetitions)")

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise self.exceeded(f"took over {TEMPLATE_DEADLINE_S:g} s to render")

    def bounded_range(self, *args: int):
        numbers = range(*args)
        if len(numbers) > TEMPLATE_MAX_RANGE:
            raise self.exceeded(f"asked for range() of {len(numbers)} items (at most {TEMPLATE_MAX_RANGE})")
        for number in numbers:
            self.check_deadline()
            yield number

    def call_binop(self, context, operator: str, left, right):
        if operator == "*":
            sequence, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sequence, str | list | tuple) and isinstance(times, int) and (
                    len(sequence) * times > TEMPLATE_MAX_CHARS):
                raise self.exceeded(f"repeats a {type(sequence).__name__} to over {TEMPLATE_MAX_CHARS} items")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and (
                abs(left) > 1 and right * abs(left).bit_length() > 10_000):
            raise self.exceeded(f"raises {left} to the power {right} (a number of over 10000 bits)")
        return super().call_binop(context, operator, left, right)


@dataclass
class JudgeTemplate:
    name: str  # bundled name or file name, with a digest of the text: editing a template renames the judge
    source: str

    def render(self, **variables: str) -> str:
        """The judge prompt. Sandboxed: a template reaches no Python internals (`''.__class__.__mro__`,
        `x.__globals__`: SecurityError, a ValueError here), and bounded (TemplateBoundError)."""
        environment = _BoundedSandbox(self.name)
        pieces, chars = [], 0
        try:
            for piece in environment.from_string(self.source).generate(**variables):
                chars += len(piece)
                if chars > TEMPLATE_MAX_CHARS:
                    raise environment.exceeded(f"rendered over {TEMPLATE_MAX_CHARS} characters")
                environment.check_deadline()
                pieces.append(piece)
        except jinja2.exceptions.SecurityError as error:
            raise ValueError(f"judge template {self.name} tried an unsafe operation, refused by the sandbox: "
                             f"{error}") from None
        return "".join(pieces)


def render_sample(template: JudgeTemplate, pointwise: bool) -> str:
    """The template rendered once on a made-up pair, as preflight does: a template that fails to render or runs
    past its bounds fails in seconds, before any model is loaded."""
    if pointwise:
        return template.render(prompt="What is 2 + 2?", response="4")
    return template.render(prompt="What is 2 + 2?", response_a="4", response_b="5")


def bundled_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


def load_template(name_or_path: str, suffix: str = "") -> JudgeTemplate:
    """A bundled template (`helpfulness`, `concise`; pointwise ones add `_yes_no` / `_score`) or a file."""
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".jinja") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"judge template file {name_or_path!r} does not exist")
        source = path.read_text()
    else:
        bundled = TEMPLATE_DIR / f"{name_or_path}{suffix}.jinja"
        if not bundled.is_file():
            raise ValueError(
                f"unknown judge template {name_or_path + suffix!r}; bundled: {bundled_templates()}, "
                "or give the path of a .jinja file"
            )
        source, path = bundled.read_text(), bundled
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return JudgeTemplate(name=f"{path.stem}@{digest}", source=source)


# ---- reading a verdict -----------------------------------------------------------------------------------
@dataclass
class Verdict:
    answer: str | None  # an option ("A", "yes", "7"), or None when there is none
    status: str  # "ok", "unparseable", "error"
    logprobs: dict[str, float] | None = None  # both options' log-probs when the verdict came from them
    source: str = "logprobs"  # "logprobs" or "text"
    malformed: str | None = None  # why the reply could not be read, naming the judge

    @property
    def gap(self) -> float | None:
        """The log-prob margin of the answer over the other option."""
        if self.logprobs is None or self.answer is None:
            return None
        return self.logprobs[self.answer] - max(v for k, v in self.logprobs.items() if k != self.answer)


def parse_choice(text: str, options: dict[str, list[str]]) -> str | None:
    """The one option the text names as a standalone word, or None (none, or more than one named)."""
    named = set()
    for option, spellings in options.items():
        pattern = r"(?<![A-Za-z0-9])(" + "|".join(re.escape(s) for s in spellings) + r")(?![A-Za-z0-9])"
        if re.search(pattern, text):
            named.add(option)
    return named.pop() if len(named) == 1 else None


def parse_score(text: str, low: int = 1, high: int = 10) -> int | None:
    """The one integer in the text, if it lies in [low, high]; anything else is None. "7/10" reads as 7."""
    text = re.sub(rf"\s*/\s*{high}(?![\w.])", "", text)
    numbers = set(re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])", text))
    if len(numbers) != 1:
        return None
    number = numbers.pop()
    if not re.fullmatch(r"\d+", number) or not low <= int(number) <= high:
        return None
    return int(number)


def read_choice(reply: JudgeReply, options: dict[str, list[str]], judge: str) -> Verdict:
    """The verdict in a reply of any backend; a malformed reply is "unparseable", never an exception."""
    if reply.error is not None:
        return Verdict(None, "error", source="none")
    malformed = malformed_reason(reply, judge)
    if malformed is not None:
        return Verdict(None, "unparseable", source="none", malformed=malformed)
    if reply.logprobs is not None and set(reply.logprobs) == set(options):
        best, second = sorted(reply.logprobs, key=reply.logprobs.get, reverse=True)[:2]
        if reply.logprobs[best] > reply.logprobs[second]:
            return Verdict(best, "ok", dict(reply.logprobs))
        return Verdict(None, "unparseable", dict(reply.logprobs))  # exactly equal: no verdict to read
    answer = parse_choice(reply.text or "", options)
    return Verdict(answer, "ok" if answer is not None else "unparseable", source="text")


def malformed_reason(reply: JudgeReply, judge: str) -> str | None:
    """Why a reply holds nothing that can be read as a verdict, naming the judge; None for a well-formed one."""
    if reply.raw.get("malformed") is not None:  # the backend's parser said why
        return reply.raw["malformed"]
    if reply.logprobs is not None and not (
            isinstance(reply.logprobs, dict) and all(is_logprob(v) for v in reply.logprobs.values())):
        return f"judge {judge!r}: log-probs {repr(reply.logprobs)[:200]} are not log-probabilities"
    if reply.text is not None and not isinstance(reply.text, str):
        return f"judge {judge!r}: answer text is {type(reply.text).__name__}, not a string"
    return None


def _verdict_raw(reply: JudgeReply, verdict: Verdict) -> dict:
    raw = {**reply.raw, "answer": verdict.answer, "status": verdict.status, "source": verdict.source}
    return raw if verdict.malformed is None else {**raw, "malformed": verdict.malformed}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# ---- pairwise --------------------------------------------------------------------------------------------
class PairwiseJudgeAnnotator:
    """Judges pairs of samples of the same prompt: samples (0, 1), (2, 3), ... by sample_index.

    Row of an agreed verdict: generation1 is the preferred sample (reward 1.0), confidence the mean
    log-prob gap of the orders (when log-probs were read), score1 the mean probability, over the orders,
    that generation1 is better (sigmoid of the A-B gap, from log-probs only), agreement True.
    """

    def __init__(
        self,
        backend: JudgeBackend,
        template: JudgeTemplate,
        both_orders: bool = True,
        on_disagreement: str = "tie",
    ):
        if on_disagreement not in ("tie", "drop"):
            raise ValueError(f"judge.on_disagreement must be 'tie' or 'drop', got {on_disagreement!r}")
        self.backend, self.template = backend, template
        self.both_orders, self.on_disagreement = both_orders, on_disagreement
        self.name = f"judge:{backend.name}:{template.name}"

    def pairs(self, generations: pd.DataFrame) -> list[tuple[pd.Series, pd.Series]]:
        pairs = []
        for group in prompt_groups(generations):
            if len(group) < 2:
                raise ValueError(
                    f"the pairwise judge needs >= 2 samples per prompt; "
                    f"prompt {group['prompt_id'].iloc[0]!r} "
                    f"has {len(group)} (generation.n_samples)"
                )
            samples = [row for _, row in group.iterrows()]
            pairs += [(samples[i], samples[i + 1]) for i in range(0, len(samples) - 1, 2)]
        return pairs

    def annotate(self, generations: pd.DataFrame) -> list[dict]:
        pairs = self.pairs(generations)
        prompts = []
        for first, second in pairs:
            prompts.append(
                self.template.render(
                    prompt=first["prompt"], response_a=first["response"], response_b=second["response"]
                )
            )
            if self.both_orders:
                prompts.append(
                    self.template.render(
                        prompt=first["prompt"], response_a=second["response"], response_b=first["response"]
                    )
                )
        replies = self.backend.complete(prompts, PAIRWISE_OPTIONS)
        per_pair = 2 if self.both_orders else 1
        return [
            self._row(first, second, replies[i * per_pair : (i + 1) * per_pair])
            for i, (first, second) in enumerate(pairs)
        ]

    def _row(self, first: pd.Series, second: pd.Series, replies: list[JudgeReply]) -> dict:
        verdicts = [read_choice(reply, PAIRWISE_OPTIONS, self.backend.name) for reply in replies]
        raw = {"orders": [_verdict_raw(r, v) for r, v in zip(replies, verdicts, strict=True)]}
        ids = (first["generation_id"], second["generation_id"])
        for failure in ("error", "unparseable"):
            if any(v.status == failure for v in verdicts):
                if failure == "error":  # the judge did not answer: an outage or a timeout is asked again by a
                    # rerun; a permanent refusal (HTTP 400) is final
                    raw["transient"] = all(r.transient for r in replies if r.error is not None)
                return annotation_row(self.name, first["prompt_id"], "pairwise", failure, raw, *ids)
        # Order 0 shows generation1 as A, order 1 shows it as B: map both to "is generation1 preferred?".
        first_wins = [verdicts[0].answer == "A"] + ([verdicts[1].answer == "B"] if len(verdicts) > 1 else [])
        probabilities = self._first_win_probabilities(verdicts)
        score1 = sum(probabilities) / len(probabilities) if probabilities else None
        agreement = (first_wins[0] == first_wins[1]) if len(first_wins) > 1 else None
        if agreement is False:
            raw["disagreement"] = True
            if self.on_disagreement == "drop":
                return annotation_row(
                    self.name, first["prompt_id"], "pairwise", "dropped", raw, *ids, agreement=False
                )
            return annotation_row(
                self.name,
                first["prompt_id"],
                "pairwise",
                "tie",
                raw,
                *ids,
                generation1_reward=0.5,
                generation2_reward=0.5,
                score1=score1,
                score2=None if score1 is None else 1 - score1,
                agreement=False,
            )
        gaps = [v.gap for v in verdicts]
        confidence = sum(gaps) / len(gaps) if all(g is not None for g in gaps) else None
        chosen, rejected = (first, second) if first_wins[0] else (second, first)
        if score1 is not None and not first_wins[0]:
            score1 = 1 - score1  # the row's generation1 is now the second sample
        return annotation_row(
            self.name,
            first["prompt_id"],
            "pairwise",
            "ok",
            raw,
            chosen["generation_id"],
            rejected["generation_id"],
            generation1_reward=1.0,
            generation2_reward=0.0,
            score1=score1,
            score2=None if score1 is None else 1 - score1,
            confidence=confidence,
            agreement=agreement,
        )

    @staticmethod
    def _first_win_probabilities(verdicts: list[Verdict]) -> list[float]:
        """P(first sample better) per order (sigmoid of the A-B gap); [] unless every order had log-probs."""
        probabilities = []
        for order, verdict in enumerate(verdicts):
            if verdict.logprobs is None:
                return []
            a_minus_b = verdict.logprobs["A"] - verdict.logprobs["B"]
            probabilities.append(_sigmoid(a_minus_b if order == 0 else -a_minus_b))
        return probabilities


# ---- pointwise -------------------------------------------------------------------------------------------
class PointwiseJudgeAnnotator:
    """Judges each response on its own and hands the scores to `rows_from_scores`.

    scale "yes_no": the score is P(yes) normalised over yes/no when log-probs are read (1.0 / 0.0 from
    text), and a label is desirable when the score is >= 0.5 (i.e. the judge said yes); scale "score": the
    1-10 integer parsed from the answer text. A two-digit "10" is two tokens for many tokenizers, so the
    next-token distribution cannot tell 1 from 10: the score scale always reads text.
    """

    def __init__(
        self, backend: JudgeBackend, template: JudgeTemplate, rules: ScoreRules, scale: str = "yes_no"
    ):
        if scale not in ("yes_no", "score"):
            raise ValueError(f"judge.pointwise_scale must be 'yes_no' or 'score', got {scale!r}")
        if scale == "yes_no" and rules.pointwise_threshold is None:
            rules = replace(rules, pointwise_threshold=0.5)  # "yes" is desirable
        self.backend, self.template, self.rules, self.scale = backend, template, rules, scale
        self.name = f"judge:{backend.name}:{template.name}"

    def score(self, reply: JudgeReply) -> Score:
        if self.scale == "yes_no":
            verdict = read_choice(reply, YES_NO_OPTIONS, self.backend.name)
            raw = _verdict_raw(reply, verdict)
            if verdict.answer is None:
                return Score(None, verdict.status,
                             {**raw, "transient": reply.transient} if verdict.status == "error" else raw)
            if verdict.logprobs is not None:
                return Score(_sigmoid(verdict.logprobs["yes"] - verdict.logprobs["no"]), "ok", raw)
            return Score(1.0 if verdict.answer == "yes" else 0.0, "ok", raw)
        if reply.error is not None:  # the judge did not answer: an outage or a timeout is asked again by a rerun
            return Score(None, "error", {**reply.raw, "transient": reply.transient})
        malformed = malformed_reason(reply, self.backend.name)
        if malformed is not None:
            return Score(None, "unparseable", {**reply.raw, "answer": None, "malformed": malformed})
        value = parse_score(reply.text or "")
        raw = {**reply.raw, "answer": value}
        return Score(None, "unparseable", raw) if value is None else Score(float(value), "ok", raw)

    def annotate(self, generations: pd.DataFrame) -> list[dict]:
        prompts = [
            self.template.render(prompt=p, response=r)
            for p, r in zip(generations["prompt"], generations["response"], strict=True)
        ]
        replies = self.backend.complete(prompts, YES_NO_OPTIONS if self.scale == "yes_no" else None)
        return rows_from_scores(self.name, generations, [self.score(r) for r in replies], self.rules)


# annotation.batch_size unset: prompts per local-judge generate call (the shipped batch size before it could be
# unset; a reward model sizes its own batches, scorers.AUTO_SCORE_TOKENS).
LOCAL_JUDGE_PROMPTS_PER_CALL = 16


def make_judge_backend(cfg: PipelineConfig) -> JudgeBackend:
    judge = cfg.annotation.judge
    if judge.backend == "http":
        return HttpJudgeBackend(
            base_url=judge.base_url,
            model=judge.model,
            api_key_env=judge.api_key_env,
            timeout_s=judge.timeout_s,
            max_retries=judge.max_retries,
            concurrency=judge.concurrency,
            max_new_tokens=judge.max_new_tokens,
            budget_s=judge.budget_s,
        )
    if judge.backend == "vllm":
        gen = cfg.generation
        return VLLMJudgeBackend(judge.model, max_new_tokens=judge.max_new_tokens,
                                dtype=cfg.annotation.dtype or cfg.model.dtype, max_model_len=gen.max_model_len,
                                tensor_parallel_size=gen.tensor_parallel_size,
                                gpu_memory_utilization=gen.gpu_memory_utilization)
    return LocalJudgeBackend(
        judge.model,
        batch_size=cfg.annotation.batch_size or LOCAL_JUDGE_PROMPTS_PER_CALL,
        max_new_tokens=judge.max_new_tokens,
        dtype=cfg.annotation.dtype or cfg.model.dtype,
    )
