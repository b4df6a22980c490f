"""Tests that catch wrong wiring: the parts are right on their own, but are they connected the right way round?

- Every loss: the Trainer's first logged loss equals `losses.<loss>` applied to log-probs this file computes
  itself (one plain forward per unpadded sequence, none of the Trainer's helpers), with a reference that
  differs from the policy (else dpo/ipo/kto start at the same value whichever way chosen and rejected go)
  and uneven sample weights; and the round moves the loss's own target on its training data.
- Gradient accumulation: 2 micro-batches of 4 make the same optimizer step as 1 of 8.
- Resume: a checkpoint written by another round (another fingerprint) is not resumed from: the round is redone.
- Evaluation: win/tie/loss by a rule with known winners, the pairwise judge in both orders, Wilson intervals.
"""

import logging
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from alignment_core import evaluation, losses
from alignment_core.annotation import JudgeReply
from alignment_core.config import parse_config
from alignment_core.models import load_causal_lm, load_reward_model, load_tokenizer
from alignment_core.rewards import positive_words
from alignment_core.store import ArtifactStore
from alignment_core.tiny import POSITIVE_WORDS, build_tiny
from alignment_core.training import Trainer

NEGATIVE = "bad sad angry terrible awful poor cold dark".split()
NOUNS = "dog cat sun moon tree river garden music".split()
WEIGHTS = [1.0, 0.5, 2.0, 1.5, 0.25, 1.0, 3.0, 0.75]  # uneven: a loss that ignores them shows


# ---- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny2_dir(tmp_path_factory) -> str:
    return str(build_tiny(tmp_path_factory.mktemp("tiny") / "llama2", num_layers=2))


@pytest.fixture(scope="module")
def reference_dir(tiny2_dir, tmp_path_factory) -> str:
    """The policy's weights plus noise: a reference that differs from the policy at step 1."""
    model = load_causal_lm(tiny2_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("reference")
    model.save_pretrained(out)
    load_tokenizer(tiny2_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def reward_dir(tiny2_dir, tmp_path_factory) -> str:
    """A reward model with a fixed score head, so that the test and the Trainer start from the same weights."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny2_dir)
    model = load_reward_model(tiny2_dir, tokenizer=tokenizer)
    out = tmp_path_factory.mktemp("reward")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


# ---- data --------------------------------------------------------------------------------------------------


def make_units(loss: str, n: int = 8, seed: int = 0) -> pd.DataFrame:
    """Prompts of random nouns. Pairwise: generation1 (preferred) positive words, generation2 negative ones.
    kto: every other sample desirable (positive words) or not (negative). rl: two samples per prompt, one
    positive (reward 1) and one negative (reward 0)."""
    rng = np.random.default_rng(seed)

    def words(pool, low=4, high=9):
        return " ".join(rng.choice(pool, size=int(rng.integers(low, high))))

    rows = []
    prompts = n // 2 if loss == "rl" else n
    for i in range(prompts):
        prompt = "Tell me about the " + " ".join(rng.choice(NOUNS, size=int(rng.integers(2, 6))))
        samples = 2 if loss == "rl" else 1
        for k in range(samples):
            index = len(rows)
            desirable = (k == 0) if loss == "rl" else (index % 2 == 0 if loss == "kto" else True)
            rows.append({
                "unit_id": f"u{index}", "prompt_id": f"p{i}", "prompt": prompt,
                "prompt_messages": [{"role": "user", "content": prompt}],
                "generation1_response": words(list(POSITIVE_WORDS) if desirable else NEGATIVE),
                "generation2_response": words(NEGATIVE),
                "generation1_reward": 1.0 if desirable else 0.0, "generation2_reward": 0.0,
            })
    return pd.DataFrame(rows)


def weights_for(units: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"unit_id": units["unit_id"], "generation1_weight": WEIGHTS[: len(units)],
                         "generation2_weight": WEIGHTS[: len(units)]})


SETUP_OF = {"sft": "sft", "reward": "reward_modelling", "dpo": "offline_pairwise", "cdpo": "offline_pairwise",
            "ipo": "offline_pairwise", "slic": "offline_pairwise", "simpo": "offline_pairwise",
            "kto": "offline_pointwise", "rl": "rl"}
# Settings that make each loss's every term count (cdpo's smoothing, kto's class weights, slic's and cdpo's NLL
# terms).
LOSS_SETTINGS = {
    "cdpo": {"label_smoothing": 0.2, "chosen_nll_weight": 0.3},
    "kto": {"kto_desirable_weight": 1.0, "kto_undesirable_weight": 0.6, "beta": 0.5},
    "slic": {"slic_nll_weight": 0.5},
    "simpo": {"beta": 2.0},
    "ipo": {"beta": 0.5},
    "rl": {"rl_kl_coef": 0.2},
}


def make_cfg(loss: str, **training_settings):
    settings = {"loss": loss, "batch_size": 8, "epochs": 6, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                "scheduler": "constant", **LOSS_SETTINGS.get(loss, {}), **training_settings}
    return parse_config({"setup": SETUP_OF[loss], "training": settings})


def logged(store: ArtifactStore, metrics_uri: str) -> pd.DataFrame:
    frame = store.read_pandas(metrics_uri)
    return frame.pivot(index="step", columns="metric", values="value").sort_index()


# ---- log-probs, computed here ------------------------------------------------------------------------------


@torch.no_grad()
def plain_logp(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """log p(response | prompt): one forward over the unpadded sequence, a full log-softmax, the response's
    tokens summed (position t predicts token t + 1)."""
    ids = torch.tensor([prompt_ids + response_ids])
    logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    per_token = logprobs.gather(1, ids[0, 1:, None]).squeeze(1)
    return float(per_token[len(prompt_ids) - 1 :].sum())


@torch.no_grad()
def plain_score(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    return float(model(input_ids=torch.tensor([prompt_ids + response_ids])).logits[0, 0])


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def expected_loss(loss: str, cfg, encoded: list[dict], order: list[int], policy, reference) -> losses.LossOutput:
    """`losses.<loss>` on log-probs of `encoded[order]` computed with plain forwards of `policy`/`reference`."""
    tc = cfg.training
    rows = [encoded[i] for i in order]
    weights = t([row["generation1_weight"] for row in rows])
    if loss == "reward":
        chosen = t([plain_score(policy, r["prompt_ids"], r["generation1_response_ids"]) for r in rows])
        rejected = t([plain_score(policy, r["prompt_ids"], r["generation2_response_ids"]) for r in rows])
        return losses.reward(chosen, rejected, weights, margin=tc.reward_margin)

    def logps(model, side):
        return t([plain_logp(model, r["prompt_ids"], r[f"{side}_response_ids"]) for r in rows])

    counts = {side: t([len(r[f"{side}_response_ids"]) for r in rows])
              for side in ("generation1", "generation2") if f"{side}_response_ids" in rows[0]}
    chosen = logps(policy, "generation1")
    if loss == "sft":
        return losses.sft(chosen, counts["generation1"], weights)
    if loss in ("kto", "rl"):
        ref = logps(reference, "generation1")
        rewards = t([r["generation1_reward"] for r in rows])
        if loss == "rl":
            group_of = {p: g for g, p in enumerate(dict.fromkeys(r["prompt"] for r in rows))}
            groups = torch.tensor([group_of[r["prompt"]] for r in rows])
            return losses.rl(chosen, ref, rewards, groups, weights, tc.rl_kl_coef)
        # KTO's z0: response of row i after the prompt of row i + 1 (cyclically), under policy and reference.
        partner = [rows[(i + 1) % len(rows)]["prompt_ids"] for i in range(len(rows))]
        mismatched_policy = t([plain_logp(policy, p, r["generation1_response_ids"])
                               for p, r in zip(partner, rows, strict=True)])
        mismatched_reference = t([plain_logp(reference, p, r["generation1_response_ids"])
                                  for p, r in zip(partner, rows, strict=True)])
        z0 = (mismatched_policy - mismatched_reference).mean().clamp_min(0)
        return losses.kto(chosen, ref, rewards == 1, z0, weights, tc.beta, tc.kto_desirable_weight,
                          tc.kto_undesirable_weight)
    rejected = logps(policy, "generation2")
    if loss == "slic":
        return losses.slic(chosen, rejected, counts["generation1"], weights, tc.beta, tc.slic_margin,
                           tc.slic_nll_weight)
    if loss == "simpo":
        return losses.simpo(chosen, rejected, counts["generation1"], counts["generation2"], weights, tc.beta,
                            tc.simpo_gamma)
    pair = (chosen, rejected, logps(reference, "generation1"), logps(reference, "generation2"))
    if loss == "dpo":
        return losses.dpo(*pair, weights, tc.beta)
    if loss == "cdpo":
        return losses.with_chosen_nll(losses.cdpo(*pair, weights, tc.beta, tc.label_smoothing), chosen,
                                      counts["generation1"], tc.chosen_nll_weight)
    assert loss == "ipo"
    return losses.ipo(*pair, counts["generation1"], counts["generation2"], weights, tc.beta)


def target(loss: str, out: losses.LossOutput, encoded: list[dict]) -> float:
    """What each loss is meant to raise, on its training data: the mean reward margin of pairwise losses,
    the desirable - undesirable gap of implicit rewards (kto), the per-token log-prob gap between the
    rewarded and unrewarded samples (rl), minus the per-token NLL (sft)."""
    metrics = out.metrics
    if loss == "sft":
        return -float(metrics["nll"].mean())
    if loss == "kto":
        return float(np.nanmean(metrics["chosen_reward"]) - np.nanmean(metrics["rejected_reward"]))
    if loss == "rl":
        per_token = metrics["chosen_logp"] / t([len(e["generation1_response_ids"]) for e in encoded])
        rewarded = metrics["reward"] == 1
        return float(per_token[rewarded].mean() - per_token[~rewarded].mean())
    return float(metrics["reward_margin"].mean())


# ---- every loss: the Trainer computes what `losses` says, and the round moves its target ------------------------


@pytest.mark.parametrize("loss", list(losses.LOSSES))  # a new row of the table is tested here too
def test_first_logged_loss_is_the_loss_of_plain_logps_and_the_round_moves_its_target(
    loss, tiny2_dir, reference_dir, reward_dir, tmp_path
):
    cfg = make_cfg(loss)
    policy_dir = reward_dir if loss == "reward" else tiny2_dir
    store = ArtifactStore(str(tmp_path / "store"))
    trainer = Trainer(cfg, policy_path=policy_dir, tokenizer_path=None, store=store, reference_path=reference_dir)
    units = make_units(loss)
    encoded = trainer.batch_factory.encode(units, weights_for(units))
    metrics_uri = store.stage_uri("wiring", 1, "metrics")
    result = trainer.train(encoded, store.checkpoint_uri("wiring", 1), metrics_uri)
    assert result.steps == cfg.training.epochs  # one optimizer step of all 8 examples per epoch

    # The first step's micro-batch, in the Trainer's order (only KTO's mismatched pairs depend on it).
    order = trainer.plan[0][0]
    assert sorted(order) == list(range(len(encoded)))
    load = load_reward_model if loss == "reward" else load_causal_lm
    policy = load(policy_dir).eval()
    reference = load_causal_lm(reference_dir).eval()
    before = expected_loss(loss, cfg, encoded, order, policy, reference)
    first = logged(store, metrics_uri).iloc[0]
    assert first["loss"] == pytest.approx(before.loss.item(), rel=1e-4, abs=1e-5), loss
    for name in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        if name in before.metrics and name in first:
            assert first[name] == pytest.approx(float(np.nanmean(before.metrics[name])), rel=1e-3, abs=1e-4), name

    trained = load(store.local_checkpoint(result.checkpoint_uri)).eval()
    after = expected_loss(loss, cfg, encoded, order, trained, reference)
    if loss != "rl":  # RLOO's -A * log p is a gradient surrogate, not a value that must fall: target() below
        assert after.loss.item() < before.loss.item(), (loss, before.loss.item(), after.loss.item())
    assert target(loss, after, [encoded[i] for i in order]) > target(loss, before, [encoded[i] for i in order]), loss
    if loss in ("reward", "dpo", "cdpo", "ipo", "slic", "simpo"):
        assert float(after.metrics["reward_accuracy"].mean()) >= 0.75, loss


# ---- gradient accumulation ---------------------------------------------------------------------------------


def one_step(tmp_path, model_dir, batch_size: int, accumulation: int, monkeypatch=None, sgd: bool = False):
    cfg = make_cfg("dpo", batch_size=batch_size, gradient_accumulation_steps=accumulation, epochs=1)
    store = ArtifactStore(str(tmp_path / f"store-{batch_size}x{accumulation}-{sgd}"))
    trainer = Trainer(cfg, policy_path=model_dir, tokenizer_path=None, store=store)
    units = make_units("dpo")
    encoded = trainer.batch_factory.encode(units, weights_for(units))
    if sgd:  # plain SGD: the step is the gradient itself (AdamW's first step is nearly its sign)
        monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    result = trainer.train(encoded, store.checkpoint_uri("acc", 1), store.stage_uri("acc", 1, "metrics"))
    if sgd:
        monkeypatch.undo()
    assert result.steps == 1
    weights = load_causal_lm(store.local_checkpoint(result.checkpoint_uri)).state_dict()
    return weights, logged(store, store.stage_uri("acc", 1, "metrics")).iloc[0]


@pytest.mark.parametrize("sgd", [False, True], ids=["adamw", "sgd"])
def test_two_micro_batches_of_four_make_the_step_of_one_batch_of_eight(tiny2_dir, tmp_path, monkeypatch, sgd):
    whole, whole_metrics = one_step(tmp_path, tiny2_dir, 8, 1, monkeypatch, sgd)
    split, split_metrics = one_step(tmp_path, tiny2_dir, 4, 2, monkeypatch, sgd)
    start = load_causal_lm(tiny2_dir).state_dict()
    assert any(not torch.equal(start[name], whole[name]) for name in whole)  # the step moved the weights
    # AdamW's first step is lr * g / (|g| + eps), about lr * sign(g): a few coordinates whose gradient is at
    # rounding level may differ, by far less than a step (lr = 1e-3). SGD's step is lr * g itself.
    atol = 1e-6 if sgd else 5e-5
    for name, value in whole.items():
        assert torch.allclose(value, split[name], atol=atol, rtol=0), name
    # grad_norm (before clipping) is the accumulated gradient's norm: a mis-scaled micro-batch shows there
    for metric in ("loss", "grad_norm"):
        assert split_metrics[metric] == pytest.approx(whole_metrics[metric], rel=1e-5, abs=1e-7), metric


# ---- resume only from the same round -------------------------------------------------------------------------


def test_a_checkpoint_of_another_round_is_not_resumed_from_but_redone(tiny2_dir, tmp_path, caplog):
    """training/trainer.py `_resumable_state`: a checkpoint whose trainer_state fingerprint is another round's
    (other examples, config, policy or reference) is ignored with a warning, and the round starts over."""
    cfg = make_cfg("dpo", batch_size=4, epochs=1)

    def round_(store, units, name="resume"):
        trainer = Trainer(cfg, policy_path=tiny2_dir, tokenizer_path=None, store=store)
        encoded = trainer.batch_factory.encode(units)
        result = trainer.train(encoded, store.checkpoint_uri(name, 1), store.stage_uri(name, 1, "metrics"))
        return result, logged(store, store.stage_uri(name, 1, "metrics"))

    shared = ArtifactStore(str(tmp_path / "shared"))
    other_round, _ = round_(shared, make_units("dpo", seed=1))  # same length (2 steps), other examples
    with caplog.at_level(logging.WARNING, logger="alignment_core.training"):
        redone, redone_metrics = round_(shared, make_units("dpo", seed=2))
    fresh, fresh_metrics = round_(ArtifactStore(str(tmp_path / "fresh")), make_units("dpo", seed=2))
    assert redone.steps == fresh.steps == 2
    assert list(redone_metrics.index) == [1, 2]
    assert redone_metrics["loss"].tolist() == pytest.approx(fresh_metrics["loss"].tolist(), abs=1e-6)
    assert redone.metrics["loss"] != pytest.approx(other_round.metrics["loss"], abs=1e-6)
    weights = load_causal_lm(shared.local_checkpoint(redone.checkpoint_uri)).state_dict()
    fresh_weights = load_causal_lm(ArtifactStore(str(tmp_path / "fresh")).local_checkpoint(
        fresh.checkpoint_uri)).state_dict()
    for name, value in weights.items():
        assert torch.allclose(value, fresh_weights[name], atol=1e-6), name
    assert "from another round" in caplog.text


# ---- evaluation: who won --------------------------------------------------------------------------------------


def generations(responses: dict[str, str], policy: str) -> pd.DataFrame:
    return pd.DataFrame([{"prompt_id": pid, "generation_id": f"{policy}-{pid}", "prompt": f"Tell me about {pid}",
                          "prompt_messages": [{"role": "user", "content": f"Tell me about {pid}"}],
                          "response": response, "sample_index": 0} for pid, response in responses.items()])


def failing_rule(prompt: str, response: str) -> float:
    """positive_words, except that a response saying FAIL makes the rule raise (a failed verdict)."""
    if "FAIL" in response:
        raise RuntimeError("no verdict")
    return positive_words(prompt, response)


def test_compare_scores_wins_ties_and_losses_by_a_rule(monkeypatch):
    cfg = parse_config({"setup": "online_pairwise",
                        "annotation": {"annotator": "programmatic", "programmatic": f"{__name__}:failing_rule"}})
    new = generations({"win": "great happy day", "tie": "good day", "loss": "a sad day",
                       "failed": "FAIL", "only-new": "great"}, "new")
    # The baseline's rows in another order: the comparison must pair by prompt, not by position.
    baseline = generations({"loss": "wonderful joy kind", "failed": "good", "tie": "nice dog", "win": "a day"},
                           "old")
    result = evaluation.compare_responses(cfg, new, baseline).set_index("prompt_id")
    assert sorted(result.index) == ["failed", "loss", "tie", "win"]
    assert result.loc["win", "outcome"] == 1.0
    assert result.loc["tie", "outcome"] == 0.5
    assert result.loc["loss", "outcome"] == 0.0
    assert math.isnan(result.loc["failed", "outcome"])
    assert result.loc["win", ["score_new", "score_baseline"]].tolist() == [2.0, 0.0]
    assert result.loc["loss", ["score_new", "score_baseline"]].tolist() == [0.0, 3.0]
    # The policy against itself ties everywhere (iteration 1 compares the initial policy with itself).
    same = evaluation.compare_responses(cfg, new, new).dropna(subset=["outcome"])
    assert (same["outcome"] == 0.5).all()


class FakeJudge:
    """Answers A or B by a known rule: the response with more positive words, or always A (position bias)."""

    name = "fake"

    def __init__(self, biased: bool = False):
        self.biased, self.prompts = biased, []

    def complete(self, prompts, options):
        replies = []
        for prompt in prompts:
            self.prompts.append(prompt)
            a, b = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\n", prompt, re.S).groups()
            a_better = self.biased or positive_words("", a) > positive_words("", b)
            replies.append(JudgeReply(logprobs={"A": -0.1, "B": -2.5} if a_better else {"A": -2.5, "B": -0.1}))
        return replies


@pytest.mark.parametrize("biased", [False, True], ids=["fair", "position-biased"])
def test_judge_comparison_asks_both_orders_and_credits_the_right_policy(monkeypatch, biased):
    judge = FakeJudge(biased)
    monkeypatch.setattr("alignment_core.annotation.judge.make_judge_backend", lambda cfg: judge)
    judge_cfg = {"backend": "local", "model": "tiny://llama", "template": "helpfulness"}
    cfg = parse_config({"setup": "online_pairwise",
                        "annotation": {"annotator": "judge_pairwise", "judge": judge_cfg}})
    new = generations({"p-new-better": "great happy wonderful", "p-old-better": "sad cold"}, "new")
    baseline = generations({"p-old-better": "kind bright joy", "p-new-better": "dark poor"}, "old")
    result = evaluation.compare_responses(cfg, new, baseline).set_index("prompt_id")

    assert len(judge.prompts) == 4  # two prompts, both orders each
    for pid in ("p-new-better", "p-old-better"):
        a_b = [re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\n", p, re.S).groups()
               for p in judge.prompts if f"Tell me about {pid}" in p]
        pair = (new.set_index("prompt_id").loc[pid, "response"], baseline.set_index("prompt_id").loc[pid, "response"])
        assert sorted(a_b) == sorted([pair, pair[::-1]]), pid
    if biased:  # always "A": the two orders disagree, which is a tie whoever is better
        assert result["outcome"].tolist() == [0.5, 0.5]
        return
    assert result.loc["p-new-better", "outcome"] == 1.0
    assert result.loc["p-old-better", "outcome"] == 0.0
    assert result.loc["p-new-better", "score_new"] > 0.5 > result.loc["p-new-better", "score_baseline"]
    assert result.loc["p-old-better", "score_new"] < 0.5 < result.loc["p-old-better", "score_baseline"]


# ---- the Wilson interval -------------------------------------------------------------------------------------


def test_wilson_interval_known_values():
    # Textbook values (Newcombe 1998, Brown, Cai & DasGupta 2001), z = 1.96.
    assert evaluation.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert evaluation.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert evaluation.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert evaluation.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert evaluation.wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert all(math.isnan(x) for x in evaluation.wilson_interval(0, 0))


@pytest.mark.parametrize(("wins", "n", "z"), [(8, 10, 1.96), (7.5, 10, 1.96), (3, 40, 2.576), (12, 16, 1.0),
                                              (1, 3, 1.645)])
def test_wilson_bounds_are_where_the_score_test_is_at_z(wins, n, z):
    """The Wilson bounds are the two p0 with |p - p0| = z * sqrt(p0 (1 - p0) / n): the roots of
    (1 + z^2/n) p0^2 - (2p + z^2/n) p0 + p^2 = 0, solved here with the quadratic formula."""
    p = wins / n
    a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
    roots = sorted(((-b - math.sqrt(b * b - 4 * a * c)) / (2 * a), (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))
    low, high = evaluation.wilson_interval(wins, n, z=z)
    assert (low, high) == pytest.approx((max(roots[0], 0.0), min(roots[1], 1.0)), abs=1e-12)
    assert low <= p <= high


def test_win_rate_summary_counts_ties_half():
    summary = evaluation.win_rate("vs_initial", pd.Series([1.0, 0.5, 0.0, 1.0, 1.0]))
    assert summary["win_rate_vs_initial"] == pytest.approx(0.7)
    assert summary["judged_vs_initial"] == 5
    low, high = evaluation.wilson_interval(3.5, 5)
    assert (summary["win_rate_vs_initial_low"], summary["win_rate_vs_initial_high"]) == (low, high)
