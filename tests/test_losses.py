"""Each loss against its closed form on hand-computed values, weight-0 gradients, and TRL cross-checks."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from alignment_core import losses


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


ONES2 = t(1.0, 1.0)


def test_weighted_mean_reduction_and_all_zero_weights():
    assert losses.weighted_mean(t(1.0, 3.0), t(1.0, 3.0)).item() == pytest.approx((1 + 9) / 4)
    assert losses.weighted_mean(t(1.0, 3.0), t(0.0, 0.0)).item() == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        losses.weighted_mean(t(1.0, 3.0), t(1.0, -1.0))
    with pytest.raises(ValueError, match="shape"):
        losses.weighted_mean(t(1.0, 3.0), t(1.0))


def test_sft_is_per_token_nll_then_weighted_mean():
    out = losses.sft(t(-6.0, -2.0), t(3.0, 4.0), t(1.0, 3.0))
    assert out.losses.tolist() == pytest.approx([2.0, 0.5])
    assert out.loss.item() == pytest.approx((2.0 + 3 * 0.5) / 4)


def test_reward_bradley_terry_with_margin():
    out = losses.reward(t(2.0, -1.0), t(0.5, 1.0), ONES2, margin=0.5)
    assert out.losses.tolist() == pytest.approx([-logsigmoid(1.0), -logsigmoid(-2.5)])
    assert out.metrics["reward_accuracy"].tolist() == [1.0, 0.0]
    assert out.metrics["reward_margin"].tolist() == pytest.approx([1.5, -2.0])


# policy chosen, policy rejected, reference chosen, reference rejected for two pairs
PAIRS = (t(-10.0, -20.0), t(-12.0, -18.0), t(-11.0, -19.0), t(-11.0, -19.0))


def test_dpo_closed_form():
    out = losses.dpo(*PAIRS, ONES2, beta=0.5)
    # h = (pc - rc) - (pr - rr): pair 0: 1 - (-1) = 2; pair 1: -1 - 1 = -2
    assert out.losses.tolist() == pytest.approx([-logsigmoid(1.0), -logsigmoid(-1.0)])
    assert out.metrics["chosen_reward"].tolist() == pytest.approx([0.5, -0.5])
    assert out.metrics["rejected_reward"].tolist() == pytest.approx([-0.5, 0.5])
    assert out.metrics["reward_margin"].tolist() == pytest.approx([1.0, -1.0])
    assert out.metrics["reward_accuracy"].tolist() == [1.0, 0.0]
    assert out.metrics["chosen_logp"].tolist() == [-10.0, -20.0]


def test_cdpo_closed_form_and_zero_smoothing_is_dpo():
    out = losses.cdpo(*PAIRS, ONES2, beta=0.5, label_smoothing=0.2)
    assert out.losses[0].item() == pytest.approx(-0.8 * logsigmoid(1.0) - 0.2 * logsigmoid(-1.0))
    assert out.losses[1].item() == pytest.approx(-0.8 * logsigmoid(-1.0) - 0.2 * logsigmoid(1.0))
    no_smoothing = losses.cdpo(*PAIRS, ONES2, beta=0.5, label_smoothing=0.0)
    assert torch.allclose(no_smoothing.losses, losses.dpo(*PAIRS, ONES2, beta=0.5).losses)


def test_ipo_closed_form_on_length_normalised_ratios():
    out = losses.ipo(*PAIRS, t(2.0, 4.0), t(1.0, 2.0), ONES2, beta=0.25)
    # pair 0: 1/2 - (-1)/1 = 1.5; pair 1: -1/4 - 1/2 = -0.75; target 1/(2*0.25) = 2
    assert out.losses.tolist() == pytest.approx([(1.5 - 2) ** 2, (-0.75 - 2) ** 2])


def test_slic_hinge_plus_nll():
    out = losses.slic(t(-4.0, -9.0), t(-6.0, -8.0), t(2.0, 3.0), ONES2, beta=0.5, margin=2.0, nll_weight=0.1)
    # pair 0: max(0, 2 - 0.5*2) = 1, nll 4/2 = 2; pair 1: max(0, 2 - 0.5*(-1)) = 2.5, nll 9/3 = 3
    assert out.losses.tolist() == pytest.approx([1.0 + 0.2, 2.5 + 0.3])
    hinge_off = losses.slic(t(-4.0), t(-20.0), t(2.0), t(1.0), beta=0.5, margin=2.0, nll_weight=0.0)
    assert hinge_off.losses.item() == 0.0


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "ipo"])
def test_chosen_nll_weight_adds_the_chosen_per_token_nll(loss):
    """RPO: l_i + alpha * (-log pi(y_c|x) / |y_c|), the chosen response only; the metric `nll` records it."""
    x = losses.LossInput(policy_logps=t(-4.0, -9.0, -6.0, -1.0), token_counts=t(2.0, 3.0, 5.0, 7.0),
                         weights=ONES2, reference_logps=t(-5.0, -8.0, -6.0, -2.0))
    config = SimpleNamespace(beta=0.5, label_smoothing=0.2, chosen_nll_weight=0.0)
    plain = losses.LOSSES[loss].compute(x, config)
    with_nll = losses.LOSSES[loss].compute(x, SimpleNamespace(**{**vars(config), "chosen_nll_weight": 0.5}))
    assert (with_nll.losses - plain.losses).tolist() == pytest.approx([0.5 * 4 / 2, 0.5 * 9 / 3])
    assert with_nll.metrics["nll"].tolist() == pytest.approx([2.0, 3.0])
    assert "nll" not in plain.metrics


def test_simpo_length_normalised_with_margin():
    out = losses.simpo(t(-4.0, -9.0), t(-6.0, -4.0), t(2.0, 3.0), t(3.0, 1.0), ONES2, beta=2.0, gamma=0.5)
    # pair 0: 2*(-2) - 2*(-2) - 0.5 = -0.5; pair 1: 2*(-3) - 2*(-4) - 0.5 = 1.5
    assert out.losses.tolist() == pytest.approx([-logsigmoid(-0.5), -logsigmoid(1.5)])
    assert out.metrics["reward_accuracy"].tolist() == [0.0, 1.0]


def test_kto_closed_form_and_kl_estimate():
    # mismatched pairs: mean(policy - reference) = mean(1, -3) = -1, clamped to 0
    assert losses.kto_kl_estimate(t(-5.0, -7.0), t(-6.0, -4.0)).item() == 0.0
    kl = losses.kto_kl_estimate(t(-5.0, -7.0), t(-6.0, -9.0))  # mean(1, 2) = 1.5
    assert kl.item() == pytest.approx(1.5)
    out = losses.kto(
        t(-3.0, -8.0), t(-5.0, -6.0), torch.tensor([True, False]), kl, ONES2,
        beta=0.5, desirable_weight=1.5, undesirable_weight=0.7,
    )
    # desirable: r = 2 -> 1.5 * (1 - sigmoid(0.5 * (2 - 1.5))); undesirable: r = -2 -> 0.7 * (1 - sigmoid(0.5 * 3.5))
    assert out.losses.tolist() == pytest.approx([1.5 * (1 - sigmoid(0.25)), 0.7 * (1 - sigmoid(1.75))])
    assert out.metrics["chosen_reward"][0].item() == pytest.approx(1.0)
    assert math.isnan(out.metrics["chosen_reward"][1].item())
    assert out.metrics["rejected_reward"][1].item() == pytest.approx(-1.0)


def test_kto_kl_estimate_is_detached():
    policy = t(-5.0, -7.0).requires_grad_()
    assert not losses.kto_kl_estimate(policy, t(-6.0, -9.0)).requires_grad


def test_rl_leave_one_out_baseline_with_kl_penalty():
    policy, reference = t(-2.0, -4.0, -1.0, -3.0, -5.0), t(-3.0, -4.0, -1.0, -3.0, -4.0)
    rewards, groups = t(1.0, 0.0, 2.0, 4.0, 0.0), torch.tensor([0, 0, 1, 1, 1])
    out = losses.rl(policy, reference, rewards, groups, torch.ones(5, dtype=torch.float64), kl_coef=0.5)
    shaped = [1.0 - 0.5 * 1, 0.0, 2.0, 4.0, 0.0 - 0.5 * -1]  # [0.5, 0, 2, 4, 0.5]
    advantages = [0.5 - 0.0, 0.0 - 0.5, 2 - (4 + 0.5) / 2, 4 - (2 + 0.5) / 2, 0.5 - (2 + 4) / 2]
    assert out.metrics["shaped_reward"].tolist() == pytest.approx(shaped)
    assert out.metrics["advantage"].tolist() == pytest.approx(advantages)
    assert out.losses.tolist() == pytest.approx([-a * p for a, p in zip(advantages, policy.tolist(), strict=True)])


def test_rl_rejects_a_prompt_with_one_sample():
    with pytest.raises(ValueError, match="groups \\[1\\] have 1"):
        losses.rl(t(-1.0, -1.0, -1.0), t(-1.0, -1.0, -1.0), t(1.0, 0.0, 1.0), torch.tensor([0, 0, 1]),
                  t(1.0, 1.0, 1.0), kl_coef=0.1)


def _all_losses(policy_chosen, policy_rejected, weights, rows):
    """Every loss on the `rows` of three samples whose policy log-probs are given (and may carry gradient)."""
    reference_chosen, reference_rejected = t(-11.0, -19.0, -7.0)[rows], t(-11.0, -18.0, -6.0)[rows]
    counts_c, counts_r = t(3.0, 5.0, 2.0)[rows], t(4.0, 2.0, 2.0)[rows]
    desirable, rewards = torch.tensor([True, False, True])[rows], t(1.0, 0.0, 0.5)[rows]
    pair = (policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return {
        "sft": losses.sft(policy_chosen, counts_c, weights),
        "reward": losses.reward(policy_chosen, policy_rejected, weights, margin=0.3),
        "dpo": losses.dpo(*pair, weights, 0.1),
        "cdpo": losses.cdpo(*pair, weights, 0.1, 0.2),
        "ipo": losses.ipo(*pair, counts_c, counts_r, weights, 0.1),
        "slic": losses.slic(policy_chosen, policy_rejected, counts_c, weights, 0.5, 1.0, 0.1),
        "simpo": losses.simpo(policy_chosen, policy_rejected, counts_c, counts_r, weights, 2.0, 0.5),
        "kto": losses.kto(policy_chosen, reference_chosen, desirable,
                          losses.kto_kl_estimate(policy_rejected, reference_rejected), weights, 0.1),
        "rl": losses.rl(policy_chosen, reference_chosen, rewards, torch.zeros(len(rewards), dtype=torch.long),
                        weights, 0.1),
    }


@pytest.mark.parametrize("name", ["sft", "reward", "dpo", "cdpo", "ipo", "slic", "simpo", "kto", "rl"])
def test_weight_zero_removes_the_samples_gradient(name):
    weights = t(1.0, 0.0, 2.0)
    policy_chosen = t(-10.0, -20.0, -5.0).requires_grad_()
    policy_rejected = t(-12.0, -15.0, -6.0).requires_grad_()
    out = _all_losses(policy_chosen, policy_rejected, weights, rows=[0, 1, 2])[name]
    out.loss.backward()
    for grad in (policy_chosen.grad, policy_rejected.grad):
        if grad is not None:
            assert grad[1].item() == 0.0
            assert grad[[0, 2]].abs().sum().item() > 0
    if name in ("kto", "rl"):
        return  # there the sample also moves the others' KL estimate / baseline, through detached values
    # ... and the loss equals that of the batch without the sample
    keep = [0, 2]
    without = _all_losses(policy_chosen.detach()[keep], policy_rejected.detach()[keep], weights[keep], keep)[name]
    assert out.loss.item() == pytest.approx(without.loss.item())


# ---- cross-check against TRL's DPOTrainer loss -------------------------------------------------------------


def trl_dpo_loss(loss_type, beta, label_smoothing, policy_c, policy_r, reference_c, reference_r, counts_c, counts_r):
    """The batch loss TRL's DPOTrainer computes, by calling its own `_compute_loss` on a stand-in trainer.

    The stand-in model returns per-token log-probs whose first completion position holds each sequence's
    summed log-prob (TRL sums over positions), and `completion_mask` has `counts` ones per row (IPO divides
    by them). Reference log-probs come in precomputed, as with TRL's `precompute_ref_log_probs`.
    """
    trl = pytest.importorskip("trl")
    logps = torch.cat([policy_c, policy_r]).float()
    counts = torch.cat([counts_c, counts_r]).long()
    rows, width = logps.shape[0], int(counts.max()) + 1
    completion_mask = torch.zeros(rows, width, dtype=torch.long)
    for row, count in enumerate(counts.tolist()):
        completion_mask[row, 1 : 1 + count] = 1
    per_token = torch.zeros(rows, width - 1)
    per_token[:, 0] = logps

    def model(**kwargs):
        return SimpleNamespace(
            log_probs=per_token,
            entropy=torch.zeros(rows, width - 1),
            mean_logits=torch.zeros(rows, width - 1),
            is_top1=torch.zeros(rows, width - 1, dtype=torch.bool),
        )

    model.training = True
    identity = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    stand_in = SimpleNamespace(
        model=model, accelerator=identity, aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(rows, width, dtype=torch.long),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": reference_c.float(),
        "ref_rejected_logps": reference_r.float(),
    }
    return trl.DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False).item()


CROSS_CHECK = (t(-30.0, -42.5, -12.0, -55.0), t(-33.0, -40.0, -18.5, -50.0),
               t(-31.0, -41.0, -13.0, -56.0), t(-32.0, -41.5, -15.0, -49.0))
COUNTS_C, COUNTS_R = t(7.0, 9.0, 3.0, 12.0), t(8.0, 8.0, 5.0, 11.0)
ONES4 = torch.ones(4, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(beta):
    expected = trl_dpo_loss("sigmoid", beta, 0.0, *CROSS_CHECK, COUNTS_C, COUNTS_R)
    assert losses.dpo(*CROSS_CHECK, ONES4, beta).loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_trl(beta):
    expected = trl_dpo_loss("ipo", beta, 0.0, *CROSS_CHECK, COUNTS_C, COUNTS_R)
    assert losses.ipo(*CROSS_CHECK, COUNTS_C, COUNTS_R, ONES4, beta).loss.item() == pytest.approx(expected, rel=1e-5)


def test_cdpo_matches_trl():
    """TRL 1.16 has no cDPO loss type any more; cDPO is (1 - eps) * DPO(pairs) + eps * DPO(flipped pairs), so
    it is checked against TRL's sigmoid loss evaluated on the pairs and on the pairs with labels swapped."""
    beta, eps = 0.3, 0.15
    policy_c, policy_r, reference_c, reference_r = CROSS_CHECK
    as_labelled = trl_dpo_loss("sigmoid", beta, 0.0, policy_c, policy_r, reference_c, reference_r, COUNTS_C, COUNTS_R)
    flipped = trl_dpo_loss("sigmoid", beta, 0.0, policy_r, policy_c, reference_r, reference_c, COUNTS_R, COUNTS_C)
    ours = losses.cdpo(*CROSS_CHECK, ONES4, beta, label_smoothing=eps).loss.item()
    assert ours == pytest.approx((1 - eps) * as_labelled + eps * flipped, rel=1e-5)
