"""Annotators: rule-based rewards, pair selection, reward model, local LLM judge, and the annotate stage."""

import json
import math
import shutil

import pandas as pd
import pytest
import torch

from alignment_core.annotation import (
    AnnotationFailureError,
    JudgeReply,
    PairwiseJudgeAnnotator,
    PointwiseJudgeAnnotator,
    ProgrammaticAnnotator,
    RewardModelAnnotator,
    Score,
    ScoreRules,
    import_callable,
    load_template,
    make_annotator,
    rows_from_scores,
    run_annotation,
    select_pairs,
)
from alignment_core.annotation.backends import LocalJudgeBackend
from alignment_core.annotation.judge import parse_choice, parse_score
from alignment_core.config import PipelineConfig
from alignment_core.records import GENERATIONS, from_rows
from alignment_core.rewards import positive_words, response_length
from alignment_core.store import ArtifactStore


def make_generations(responses_by_prompt: dict[str, list[str]]) -> pd.DataFrame:
    """GENERATIONS-shaped rows; the token ids are deliberately meaningless (annotators must re-tokenise)."""
    rows = []
    for prompt_id, responses in responses_by_prompt.items():
        for index, response in enumerate(responses):
            rows.append(
                {
                    "generation_id": f"{prompt_id}-g{index}",
                    "prompt_id": prompt_id,
                    "prompt": f"Question {prompt_id}?",
                    "prompt_messages": [{"role": "user", "content": f"Question {prompt_id}?"}],
                    "sample_index": index,
                    "response": response,
                    "response_token_ids": [10**6],
                    "token_logprobs": None,
                    "sum_logprob": None,
                    "finish_reason": "stop",
                    "policy_uri": "tiny://llama",
                    "policy_digest": "0" * 16,
                    "sampling_params": "{}",
                    "seed": 0,
                    "backend": "transformers",
                }
            )
    return from_rows(rows, GENERATIONS).to_pandas()


def by_status(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


# ---- rule-based rewards ----------------------------------------------------------------------------------
def test_positive_words_counts_distinct_words_and_penalises_length():
    assert positive_words("", "A great day, and a happy one.") == 2.0
    assert positive_words("", "Great! GREAT great, great.") == 1.0  # repeating one word pays once
    assert positive_words("", "nothing nice here is wonderful") == 2.0
    assert positive_words("", "") == 0.0
    padded = "great happy " + "and then " * 15  # 32 words: 12 over the free 20
    assert positive_words("", padded) == pytest.approx(2.0 - 0.05 * 12)
    assert positive_words("", padded) < positive_words("", "great happy")  # padding never pays
    assert positive_words("", "great " * 40) == pytest.approx(0.0)  # 1 word, 20 over the limit
    assert response_length("", "one two, three!") == 3.0


# ---- pair selection and scores -> rows -------------------------------------------------------------------
def test_select_pair_rules_on_hand_built_scores():
    import random

    def select_pair(scores, rule, rng):
        (pair,) = select_pairs(scores, rule, rng)  # one pair per prompt for every rule but all_pairs
        return pair

    scores = {"a": 1.0, "b": 3.0, "c": 2.0, "d": 0.5}
    assert select_pair(scores, "best_vs_worst", random.Random(0)) == ("b", "d")
    others = {select_pair(scores, "best_vs_random", random.Random(seed))[1] for seed in range(40)}
    assert others == {"a", "c", "d"}  # the best against each of the others, never itself
    assert {select_pair(scores, "best_vs_random", random.Random(seed))[0] for seed in range(40)} == {"b"}
    for seed in range(40):
        chosen, rejected = select_pair(scores, "random", random.Random(seed))
        assert chosen != rejected and scores[chosen] >= scores[rejected]
    assert select_pair({"x": 1.0, "y": 1.0}, "best_vs_worst", random.Random(0)) == (
        "x",
        "y",
    )  # ties: sample order
    with pytest.raises(ValueError, match="two scored samples"):
        select_pair({"x": 1.0}, "best_vs_worst", random.Random(0))
    # all_pairs: every two samples once, the higher-scored one preferred.
    assert sorted(select_pairs(scores, "all_pairs", random.Random(0))) == sorted(
        [("b", "a"), ("a", "d"), ("c", "a"), ("b", "c"), ("b", "d"), ("c", "d")])


def test_all_pairs_with_a_minimum_margin():
    generations = make_generations({"p1": ["g0", "g1", "g2", "g3"]})
    values = [1.0, 3.0, 2.9, 0.0]
    rules = ScoreRules(mode="pairs", pair_selection="all_pairs", min_margin=0.5)
    rows = rows_from_scores("rule", generations, [Score(v) for v in values], rules)
    assert len(rows) == 6 and len({r["annotation_id"] for r in rows}) == 6
    kept = {(r["generation1_id"], r["generation2_id"]) for r in rows if r["status"] == "ok"}
    assert kept == {("p1-g1", "p1-g0"), ("p1-g2", "p1-g0"), ("p1-g0", "p1-g3"), ("p1-g1", "p1-g3"),
                    ("p1-g2", "p1-g3")}
    skipped = [r for r in rows if r["status"] == "skipped"]  # g1 vs g2: margin 0.1 < 0.5, counted, not trained
    assert [(r["generation1_id"], r["generation2_id"]) for r in skipped] == [("p1-g1", "p1-g2")]
    assert all(json.loads(r["raw"])["rule"] == "all_pairs" for r in rows)


def test_pairs_from_scores_min_margin_skips_are_counted_rows():
    generations = make_generations({"p1": ["r0", "r1", "r2"], "p2": ["r0", "r1"], "p3": ["r0", "r1"]})
    scores = [Score(v) for v in (1.0, 3.0, 2.0, 1.0, 1.2, 2.0, 2.0)]
    rows = rows_from_scores("test", generations, scores, ScoreRules(mode="pairs", min_margin=0.5))
    assert [(r["prompt_id"], r["status"]) for r in rows] == [
        ("p1", "ok"),
        ("p2", "skipped"),
        ("p3", "skipped"),
    ]
    ok = rows[0]
    assert (ok["generation1_id"], ok["generation2_id"]) == ("p1-g1", "p1-g0")
    assert (ok["generation1_reward"], ok["generation2_reward"], ok["score1"], ok["score2"]) == (
        1.0,
        0.0,
        3.0,
        1.0,
    )
    assert json.loads(ok["raw"])["scores"] == {"p1-g0": 1.0, "p1-g1": 3.0, "p1-g2": 2.0}
    assert rows[1]["generation1_reward"] is None and json.loads(rows[1]["raw"])["margin"] == pytest.approx(
        0.2
    )

    rows = rows_from_scores("test", generations, scores, ScoreRules(mode="pairs"))
    assert [r["status"] for r in rows] == ["ok", "ok", "tie"]
    assert (rows[2]["generation1_reward"], rows[2]["generation2_reward"]) == (0.5, 0.5)
    # the same content gives the same ids and pairs (resume), another annotator other ids
    again = rows_from_scores("test", generations, scores, ScoreRules(mode="pairs"))
    assert [r["annotation_id"] for r in again] == [r["annotation_id"] for r in rows]
    assert (
        rows_from_scores("other", generations, scores, ScoreRules())[0]["annotation_id"]
        != rows[0]["annotation_id"]
    )


def test_random_pair_selection_is_seeded():
    generations = make_generations({f"p{i}": [f"r{j}" for j in range(4)] for i in range(8)})
    scores = [Score(float(v)) for v in range(len(generations))]
    pick = lambda seed: [  # noqa: E731
        (r["generation1_id"], r["generation2_id"])
        for r in rows_from_scores("t", generations, scores, ScoreRules(pair_selection="random", seed=seed))
    ]
    assert pick(0) == pick(0)
    assert pick(0) != pick(1)


def test_pointwise_rows_labels_and_rewards():
    generations = make_generations({"p1": ["a", "b", "c"], "p2": ["a", "b"]})
    scores = [Score(1.0), Score(2.0), Score(3.0), Score(None, "error", {"error": "boom"}), Score(5.0)]
    rows = rows_from_scores("t", generations, scores, ScoreRules(mode="labels"))  # per-prompt median
    labels = {r["generation1_id"]: (r["status"], r["generation1_reward"]) for r in rows}
    assert labels == {
        "p1-g0": ("ok", 0.0),
        "p1-g1": ("ok", 1.0),
        "p1-g2": ("ok", 1.0),  # median 2: >= is desirable
        "p2-g0": ("error", None),
        "p2-g1": ("skipped", None),  # one score left: no median to compare with
    }
    rows = rows_from_scores("t", generations, scores, ScoreRules(mode="labels", pointwise_threshold=2.5))
    assert [r["generation1_reward"] for r in rows if r["status"] == "ok"] == [0.0, 0.0, 1.0, 1.0]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error", "ok"]
    rows = rows_from_scores("t", generations, scores, ScoreRules(mode="rewards"))
    assert [r["generation1_reward"] for r in rows if r["status"] == "ok"] == [1.0, 2.0, 3.0, 5.0]
    assert all(r["kind"] == "pointwise" and r["generation2_id"] is None for r in rows)
    single = make_generations({"p1": ["a"]})
    with pytest.raises(ValueError, match="need >= 2 samples per prompt.*pointwise_threshold"):
        rows_from_scores("t", single, [Score(1.0)], ScoreRules(mode="labels"))
    with pytest.raises(ValueError, match=">= 2 samples"):
        rows_from_scores("t", single, [Score(1.0)], ScoreRules(mode="pairs"))


# ---- programmatic ----------------------------------------------------------------------------------------
def failing_reward(prompt: str, response: str) -> float:
    if "boom" in response:
        raise RuntimeError("cannot score this")
    return math.nan if "nan" in response else float(len(response))


def test_import_callable_fails_clearly():
    assert import_callable("alignment_core.rewards:positive_words") is positive_words
    with pytest.raises(ValueError, match="must be 'module:function'"):
        import_callable("alignment_core.rewards.positive_words")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        import_callable("no_such_module:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        import_callable("alignment_core.rewards:nope")
    with pytest.raises(ValueError, match="not callable"):
        import_callable("alignment_core.rewards:FREE_WORDS")


def test_programmatic_annotator_prefers_the_true_reward():
    generations = make_generations(
        {
            "p1": ["It was a bad day.", "What a great and happy day!", "great great great great"],
            "p2": ["boom", "fine", "nan"],
        }
    )
    annotator = ProgrammaticAnnotator("alignment_core.rewards:positive_words", ScoreRules())
    rows = annotator.annotate(generations.iloc[:3])
    assert annotator.name == "programmatic:alignment_core.rewards:positive_words"
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    assert (rows[0]["generation1_id"], rows[0]["generation2_id"]) == ("p1-g1", "p1-g0")
    assert (rows[0]["score1"], rows[0]["score2"]) == (2.0, 0.0)

    rows = ProgrammaticAnnotator(f"{__name__}:failing_reward", ScoreRules()).annotate(generations)
    assert by_status(rows) == {"ok": 1, "error": 2}  # p2 keeps one scored sample: no pair, two error rows
    errors = [json.loads(r["raw"])["error"] for r in rows if r["status"] == "error"]
    assert errors == ["RuntimeError: cannot score this", "non-finite reward nan"]


# ---- reward model ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_model_with_own_template(tiny_reward_model_dir, tmp_path_factory):
    """The tiny reward model, its tokenizer given a chat template that no policy uses."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("rm") / "reward"
    shutil.copytree(tiny_reward_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[reply] "
    )
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_reward_model_scores_with_its_own_tokenizer(reward_model_with_own_template):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    generations = make_generations(
        {"p1": ["a good day", "bad", "a wonderful and kind answer"], "p2": ["x", "y y"]}
    )
    annotator = RewardModelAnnotator(reward_model_with_own_template, ScoreRules(mode="rewards"), batch_size=2)
    sequences = annotator.sequences(generations["prompt_messages"], generations["response"])
    # The reward model's template; it writes no token after a reply, so the response ends with EOS.
    tokenizer = AutoTokenizer.from_pretrained(reward_model_with_own_template)
    prompt, response = "<|bos|>[user] Question p1?\n[reply] ", "a good day"
    assert sequences[0] == (tokenizer(prompt, add_special_tokens=False).input_ids
                            + tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])

    # Reference: each sequence alone (no padding), through a fresh load of the same folder.
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_with_own_template).eval()
    with torch.no_grad():
        expected = [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in sequences]
    rows = annotator.annotate(generations)
    assert [r["generation1_id"] for r in rows] == list(generations["generation_id"])
    assert [r["generation1_reward"] for r in rows] == pytest.approx(expected, abs=1e-4)
    assert len(set(round(e, 4) for e in expected)) == len(expected)  # the scores do differ
    assert (
        rows[0]["annotator"].startswith("reward_model:")
        and len(rows[0]["annotator"]) == len("reward_model:") + 16
    )

    pairs = RewardModelAnnotator(reward_model_with_own_template, ScoreRules(mode="pairs")).annotate(
        generations
    )
    best, worst = max(expected[:3]), min(expected[:3])
    assert pairs[0]["score1"] == pytest.approx(best, abs=1e-4) and pairs[0]["score2"] == pytest.approx(
        worst, abs=1e-4
    )


def test_tiny_reward_uri_builds_a_reward_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # tiny://reward is built under ~/.cache/alignment_core
    annotator = RewardModelAnnotator("tiny://reward", ScoreRules(mode="rewards"))
    rows = annotator.annotate(make_generations({"p": ["hello", "a great day"]}))
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(math.isfinite(r["score1"]) for r in rows)
    assert (tmp_path / ".cache/alignment_core/tiny-reward/config.json").exists()


# ---- verdict parsing -------------------------------------------------------------------------------------
def test_strict_verdict_parsing():
    options = {"A": ["A"], "B": ["B"]}
    assert parse_choice("A", options) == "A"
    assert parse_choice(" B.\n", options) == "B"
    assert parse_choice("Response A is better", options) == "A"
    assert parse_choice("A or B", options) is None  # both named: never guessed
    assert parse_choice("Both are fine", options) is None
    assert parse_choice("ABBA", options) is None  # not a standalone letter
    assert parse_score("7") == 7 and parse_score("Score: 10/10") == 10 and parse_score("10") == 10
    assert parse_score("11") is None and parse_score("7.5") is None and parse_score("none") is None
    assert parse_score("3 or 4") is None and parse_score("7/10") == 7 and parse_score("7 out of 10") is None


# ---- judge combination logic, on a scripted backend ------------------------------------------------------
class ScriptedBackend:
    """Answers each rendered prompt by a rule: the judge logic is then tested without a model."""

    name = "scripted"

    def __init__(self, answer):
        self.answer, self.prompts = answer, []

    def complete(self, prompts, options):
        self.prompts += prompts
        return [self.answer(p) for p in prompts]


def first_shown(prompt: str, needle: str, other: str) -> bool:
    return prompt.index(needle) < prompt.index(other)


def test_pairwise_judge_both_orders_agreement_ties_and_failures():
    generations = make_generations({"p1": ["plain", "the better one"], "p2": ["x", "y"]})
    template = load_template("helpfulness")

    def prefers_better(prompt):  # consistent judge, log-probs given: "the better one" wins in both orders
        if "the better one" not in prompt:
            return JudgeReply(text="A or B")
        winner = "A" if first_shown(prompt, "the better one", "plain") else "B"
        return JudgeReply(logprobs={winner: -0.1, "AB".replace(winner, ""): -2.1})

    backend = ScriptedBackend(prefers_better)
    rows = PairwiseJudgeAnnotator(backend, template).annotate(generations)
    assert len(backend.prompts) == 4  # two pairs, both orders
    assert (
        "[Response A]\nplain" in backend.prompts[0] and "[Response A]\nthe better one" in backend.prompts[1]
    )
    good, garbage = rows
    assert good["status"] == "ok" and good["agreement"] is True
    assert (good["generation1_id"], good["generation2_id"]) == ("p1-g1", "p1-g0")
    assert good["confidence"] == pytest.approx(2.0)
    assert good["score1"] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert garbage["status"] == "unparseable" and garbage["generation1_reward"] is None
    assert [o["source"] for o in json.loads(garbage["raw"])["orders"]] == ["text", "text"]

    always_a = ScriptedBackend(lambda prompt: JudgeReply(text="A"))  # pure position bias
    tie, _ = PairwiseJudgeAnnotator(always_a, template).annotate(generations)
    assert (tie["status"], tie["agreement"], tie["generation1_reward"], tie["generation2_reward"]) == (
        "tie",
        False,
        0.5,
        0.5,
    )
    dropped, _ = PairwiseJudgeAnnotator(always_a, template, on_disagreement="drop").annotate(generations)
    assert (dropped["status"], dropped["generation1_reward"]) == ("dropped", None)
    single, _ = PairwiseJudgeAnnotator(always_a, template, both_orders=False).annotate(generations)
    assert (single["status"], single["agreement"], single["generation1_id"]) == ("ok", None, "p1-g0")

    failing = ScriptedBackend(lambda prompt: JudgeReply(error="HTTP 500"))
    assert {r["status"] for r in PairwiseJudgeAnnotator(failing, template).annotate(generations)} == {"error"}


def test_pointwise_judge_yes_no_and_score():
    generations = make_generations({"p1": ["great answer", "poor answer", "???"]})
    yes_no = ScriptedBackend(
        lambda p: (
            JudgeReply(logprobs={"yes": -0.5, "no": -1.5})
            if "great" in p
            else (JudgeReply(text="No.") if "poor" in p else JudgeReply(text="maybe"))
        )
    )
    rules = ScoreRules(mode="labels")
    rows = PointwiseJudgeAnnotator(yes_no, load_template("helpfulness", "_yes_no"), rules).annotate(
        generations
    )
    assert "Is this response desirable?" in yes_no.prompts[0]
    assert [(r["status"], r["generation1_reward"]) for r in rows] == [
        ("unparseable", None),
        ("ok", 1.0),
        ("ok", 0.0),
    ]  # failed rows come first in a prompt
    assert rows[1]["score1"] == pytest.approx(1 / (1 + math.exp(-1.0)))

    score = ScriptedBackend(
        lambda p: (
            JudgeReply(text="8")
            if "great" in p
            else JudgeReply(text="Score: 3")
            if "poor" in p
            else JudgeReply(text="between 4 and 5")
        )
    )
    rows = PointwiseJudgeAnnotator(
        score, load_template("concise", "_score"), ScoreRules(mode="rewards"), scale="score"
    ).annotate(generations)
    assert [(r["status"], r["generation1_reward"]) for r in rows] == [
        ("unparseable", None),
        ("ok", 8.0),
        ("ok", 3.0),
    ]


def test_templates_resolve_by_name_or_path(tmp_path):
    assert load_template("concise").name.startswith("concise@")
    custom = tmp_path / "mine.jinja"
    custom.write_text("Pick: {{ response_a }} / {{ response_b }} for {{ prompt }}")
    template = load_template(str(custom))
    assert template.render(prompt="q", response_a="1", response_b="2") == "Pick: 1 / 2 for q"
    with pytest.raises(ValueError, match="unknown judge template 'nope'"):
        load_template("nope")
    with pytest.raises(FileNotFoundError):
        load_template(str(tmp_path / "missing.jinja"))


# ---- local judge: the tiny model, verdicts from its next-token log-probs ---------------------------------
def test_local_pairwise_judge_reads_next_token_logprobs(tiny_model_dir):
    tiny_model_dir = str(tiny_model_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    generations = make_generations({"p1": ["a great day", "a bad day"], "p2": ["sun", "moon and sky"]})
    backend = LocalJudgeBackend(tiny_model_dir, batch_size=4)
    annotator = PairwiseJudgeAnnotator(backend, load_template("helpfulness"))
    rows = annotator.annotate(generations)
    assert annotator.name.startswith(f"judge:{tiny_model_dir}:helpfulness@")

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    a_id, b_id = tokenizer.convert_tokens_to_ids("A"), tokenizer.convert_tokens_to_ids("B")
    space_a, space_b = (
        tokenizer.encode(" A", add_special_tokens=False),
        tokenizer.encode(" B", add_special_tokens=False),
    )

    def reference_logprobs(first: str, second: str, prompt: str) -> dict:
        text = annotator.template.render(prompt=prompt, response_a=first, response_b=second)
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)
        out = {}
        for option, single, spaced in (("A", a_id, space_a), ("B", b_id, space_b)):
            ids_ = {single} | ({spaced[0]} if len(spaced) == 1 else set())
            out[option] = torch.logsumexp(logp[sorted(ids_)], dim=0).item()
        return out

    for row, (first, second) in zip(
        rows, [("a great day", "a bad day"), ("sun", "moon and sky")], strict=True
    ):
        orders = json.loads(row["raw"])["orders"]
        assert len(orders) == 2 and all(o["source"] == "logprobs" for o in orders)
        for order, (shown_a, shown_b) in zip(orders, [(first, second), (second, first)], strict=True):
            expected = reference_logprobs(
                shown_a, shown_b, generations["prompt"].iloc[0 if first[0] == "a" else 2]
            )
            assert order["logprobs"] == pytest.approx(expected, abs=1e-4)  # left padding changed nothing
            assert order["answer"] == max(expected, key=expected.get)
        first_wins = [orders[0]["answer"] == "A", orders[1]["answer"] == "B"]
        assert row["agreement"] == (first_wins[0] == first_wins[1])
        assert row["status"] == ("ok" if row["agreement"] else "tie")
        if row["agreement"]:
            gaps = [abs(o["logprobs"]["A"] - o["logprobs"]["B"]) for o in orders]
            assert row["confidence"] == pytest.approx(sum(gaps) / 2, abs=1e-4)
            assert row["generation1_reward"] == 1.0


def test_local_judge_needs_single_token_answers(tiny_model_dir):
    backend = LocalJudgeBackend(str(tiny_model_dir))
    with pytest.raises(ValueError, match="no single token for the answer 'maybe'"):
        backend.option_token_ids({"maybe": ["perhaps maybe not"]})


# ---- the stage -------------------------------------------------------------------------------------------
def write_generations(store: ArtifactStore, generations: pd.DataFrame) -> str:
    uri = store.stage_uri("run", 0, "generations")
    store.write_stage(
        uri, "generations", {"test": 1}, [from_rows(generations.to_dict("records"), GENERATIONS)]
    )
    return uri


def test_run_annotation_shards_by_prompt_resumes_and_skips(tmp_path, monkeypatch):
    import alignment_core.annotation.stage as stage

    store = ArtifactStore(str(tmp_path))
    responses = ["a good day", "a great and happy day", "meh"]
    generations_uri = write_generations(store, make_generations({f"p{i}": responses for i in range(5)}))
    cfg = PipelineConfig.model_validate({"generation": {"shard_size": 2}})
    out = store.stage_uri("run", 0, "annotations")
    annotated = []
    real_make_annotator = stage.make_annotator

    def counting_make_annotator(cfg, ask=None):
        annotator = real_make_annotator(cfg, ask)
        real_annotate = annotator.annotate
        annotator.annotate = lambda frame: (
            annotated.append(sorted(set(frame["prompt_id"]))) or real_annotate(frame)
        )
        return annotator

    monkeypatch.setattr(stage, "make_annotator", counting_make_annotator)
    manifest = run_annotation(store, generations_uri, out, cfg, {"fp": 1})
    assert annotated == [["p0", "p1"], ["p2", "p3"], ["p4"]]  # whole prompts per shard
    assert manifest["rows"] == 5 and manifest["extra"]["counts"] == {"ok": 5}
    assert manifest["extra"]["failure_fraction"] == 0.0
    assert manifest["extra"]["score_mean"] == pytest.approx(1.0)  # scores 2 (chosen) and 0 (rejected)
    assert manifest["extra"]["annotators"] == ["programmatic:alignment_core.rewards:positive_words"]

    annotated.clear()
    assert run_annotation(store, generations_uri, out, cfg, {"fp": 1})["rows"] == 5
    assert annotated == []  # complete: nothing recomputed

    (tmp_path / "run/iter-000/annotations/_manifest.json").unlink()
    (tmp_path / "run/iter-000/annotations/part-00001.parquet").unlink()
    manifest = run_annotation(store, generations_uri, out, cfg, {"fp": 1})
    assert annotated == [["p2", "p3"]]  # resumed at the missing shard only
    assert manifest["rows"] == 5 and manifest["extra"]["counts"] == {"ok": 5}


def test_failure_fraction_guard(tmp_path):
    store = ArtifactStore(str(tmp_path))
    generations_uri = write_generations(store, make_generations({"p1": ["boom", "a"], "p2": ["ab", "abc"]}))
    cfg = PipelineConfig.model_validate(
        {
            "setup": "rl",
            "training": {"loss": "rl"},
            "annotation": {"programmatic": f"{__name__}:failing_reward", "max_failure_fraction": 0.2},
        }
    )
    out = store.stage_uri("run", 0, "annotations")
    with pytest.raises(AnnotationFailureError, match=r"1 of 4 annotations failed \(25.0% > .*error 1"):
        run_annotation(store, generations_uri, out, cfg, {"fp": 1})
    assert store.read_manifest(out) is None  # not complete
    cfg.annotation.max_failure_fraction = 0.25
    manifest = run_annotation(store, generations_uri, out, cfg, {"fp": 2})
    assert manifest["extra"]["counts"] == {"error": 1, "ok": 3}
    assert manifest["extra"]["label_mean"] == pytest.approx(2.0)  # rewards 1, 2, 3


def test_a_pairwise_judge_for_a_reward_setup_is_refused_when_the_config_loads():
    # a missing reward model or judge model already fails when the config loads (tests/test_config.py)
    with pytest.raises(ValueError, match="gives preference pairs, but setup 'rl' needs rewards"):
        make_annotator(PipelineConfig.model_validate({
            "setup": "rl", "training": {"loss": "rl"},
            "annotation": {"annotator": "judge_pairwise", "judge": {"model": "tiny://llama"}},
        }))
    with pytest.raises(ValueError, match="cannot import module"):
        make_annotator(PipelineConfig.model_validate({"annotation": {"programmatic": "nowhere:f"}}))


def test_reward_model_loads_in_its_own_dtype(tiny_reward_model_dir):
    from alignment_core.annotation import make_annotator
    from alignment_core.config import parse_config

    base = {"setup": "rl", "training": {"loss": "rl"}, "generation": {"n_samples": 2},
            "annotation": {"annotator": "reward_model", "reward_model": str(tiny_reward_model_dir)}}
    assert make_annotator(parse_config(base)).model.dtype == torch.float32  # model.dtype's default
    own = {**base, "annotation": {**base["annotation"], "dtype": "bfloat16"}}
    assert make_annotator(parse_config(own)).model.dtype == torch.bfloat16


def test_equal_option_log_probs_are_no_verdict():
    from alignment_core.annotation.backends import JudgeReply
    from alignment_core.annotation.judge import read_choice

    options = {"A": ["A"], "B": ["B"]}
    assert read_choice(JudgeReply(logprobs={"A": -0.7, "B": -0.7}), options, "judge").status == "unparseable"
    verdict = read_choice(JudgeReply(logprobs={"A": -0.69, "B": -0.7}), options, "judge")
    assert (verdict.answer, verdict.status) == ("A", "ok")
