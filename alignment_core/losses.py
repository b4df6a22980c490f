"""Weighted training losses on per-sequence log-probabilities.

Every function here works on tensors the Trainer already reduced to one number per sequence (the log-prob
of the response summed over its tokens, and how many tokens it has), in the style of
eric-mitchell/direct-preference-optimization's `preference_loss`. None of them touches a model.

Reduction, the same for every loss: each sample i has a loss l_i and a weight w_i >= 0 (from the batch's
`generation1_weight`), and the batch loss is the weighted mean

    L = sum_i w_i * l_i / sum_i w_i        (0 when every weight is 0)

so a sample with weight 0 contributes exactly nothing, value or gradient. The Trainer uses the same
formula with the weight sum taken over the whole optimizer step (all micro-batches, all processes), so the
step's gradient does not depend on how the step was split.

Each function returns a `LossOutput`: the per-sample losses, the weights, and per-sample metrics (detached;
NaN where a metric does not apply to a sample, e.g. a KTO "chosen" reward on an undesirable sample).

`LOSSES` at the end is the table the Trainer reads: one row per loss, saying what the loss needs (one or two
responses, the reference model, a reward head, per-prompt groups, KTO's mismatched pairs) and how it is
called on a `LossInput` with its hyper-parameters from the training config. Adding a loss is one function
here plus one row there (README: Extending).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class LossOutput:
    losses: Tensor  # [B] per-sample losses l_i, with gradient
    weights: Tensor  # [B] per-sample weights w_i >= 0
    metrics: dict[str, Tensor]  # name -> [B] detached per-sample values (NaN: not defined for that sample)

    @property
    def loss(self) -> Tensor:
        """The weighted mean sum_i w_i l_i / sum_i w_i of this batch alone."""
        return weighted_mean(self.losses, self.weights)


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """sum_i w_i v_i / sum_i w_i; 0 (with zero gradient) when all weights are 0."""
    check_weights(weights, values.shape[0])
    total = weights.sum()
    return (weights * values).sum() / torch.where(total > 0, total, torch.ones_like(total))


def check_weights(weights: Tensor, batch_size: int) -> None:
    if weights.shape != (batch_size,):
        raise ValueError(f"weights must have shape ({batch_size},), got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"weights must be finite and >= 0, got {weights.tolist()}")


def _detached(**values: Tensor) -> dict[str, Tensor]:
    return {name: value.detach().float() for name, value in values.items()}


def _pair_metrics(
    chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> dict[str, Tensor]:
    return _detached(
        chosen_reward=chosen_rewards,
        rejected_reward=rejected_rewards,
        reward_margin=chosen_rewards - rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).float(),
        chosen_logp=chosen_logps,
        rejected_logp=rejected_logps,
    )


def _reference_pair_metrics(
    beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> dict[str, Tensor]:
    """Pair metrics with implicit rewards beta * (log pi - log ref), and the drift monitor `logratio_mean`:
    the mean of log pi(y|x) - log ref(y|x) over a pair's two responses. It is not a KL: the responses were
    sampled before this round (or come from a dataset), so it can be negative; it estimates KL(pi || ref) only
    for responses sampled from pi itself."""
    metrics = _pair_metrics(beta * chosen_logratios, beta * rejected_logratios, chosen_logps, rejected_logps)
    metrics["logratio_mean"] = ((chosen_logratios + rejected_logratios) / 2).detach().float()
    return metrics


# ---- supervised ------------------------------------------------------------------------------------------


def sft(policy_logps: Tensor, token_counts: Tensor, weights: Tensor) -> LossOutput:
    """Supervised fine-tuning: the token NLL averaged over each response's tokens.

        l_i = -log pi(y_i | x_i) / |y_i|

    i.e. each sample counts once whatever its length, then the weighted mean over samples.
    """
    losses = -policy_logps / token_counts.clamp_min(1)
    return LossOutput(losses, weights, _detached(nll=losses, chosen_logp=policy_logps))


def reward(
    chosen_scores: Tensor, rejected_scores: Tensor, weights: Tensor, margin: float = 0.0
) -> LossOutput:
    """Bradley-Terry loss of a reward model that scores each (prompt, response) with one number r.

        l_i = -log sigmoid(r(x, y_c) - r(x, y_r) - margin)

    A positive `margin` asks the chosen score to exceed the rejected one by at least that much.
    """
    losses = -F.logsigmoid(chosen_scores - rejected_scores - margin)
    metrics = _detached(
        chosen_reward=chosen_scores,
        rejected_reward=rejected_scores,
        reward_margin=chosen_scores - rejected_scores,
        reward_accuracy=(chosen_scores > rejected_scores).float(),
    )
    return LossOutput(losses, weights, metrics)


# ---- pairwise preference losses against a reference -------------------------------------------------------


def dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    weights: Tensor,
    beta: float,
) -> LossOutput:
    """DPO (Rafailov et al. 2023), the sigmoid loss.

        h_i = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))
        l_i = -log sigmoid(beta * h_i)

    Implicit rewards (metrics): beta * (log pi - log ref) of each response.
    """
    return cdpo(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        weights, beta, label_smoothing=0.0,
    )


def cdpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    weights: Tensor,
    beta: float,
    label_smoothing: float,
) -> LossOutput:
    """Conservative DPO: DPO when each preference label is flipped with probability eps.

        l_i = -(1 - eps) * log sigmoid(beta * h_i) - eps * log sigmoid(-beta * h_i)

    with h_i as in `dpo` (eps = 0 is DPO).
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    metrics = _reference_pair_metrics(
        beta, chosen_logratios, rejected_logratios, policy_chosen_logps, policy_rejected_logps
    )
    return LossOutput(losses, weights, metrics)


def ipo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_token_counts: Tensor,
    rejected_token_counts: Tensor,
    weights: Tensor,
    beta: float,
) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17) on length-normalised log-ratios.

        h_i = (log pi(y_c|x) - log ref(y_c|x)) / |y_c| - (log pi(y_r|x) - log ref(y_r|x)) / |y_r|
        l_i = (h_i - 1 / (2 * beta))^2

    The per-token normalisation keeps beta comparable across lengths; it is TRL's choice, which its authors
    confirmed with the IPO authors (trl/trainer/dpo_trainer.py, loss_type "ipo").
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    h = (chosen_logratios / chosen_token_counts.clamp_min(1)
         - rejected_logratios / rejected_token_counts.clamp_min(1))
    losses = (h - 1 / (2 * beta)) ** 2
    metrics = _reference_pair_metrics(
        beta, chosen_logratios, rejected_logratios, policy_chosen_logps, policy_rejected_logps
    )
    return LossOutput(losses, weights, metrics)


def with_chosen_nll(output: LossOutput, chosen_logps: Tensor, chosen_token_counts: Tensor,
                    nll_weight: float) -> LossOutput:
    """A pairwise loss plus `nll_weight` times the chosen response's per-token NLL (RPO, Pang et al. 2024):

        l_i' = l_i + nll_weight * (-log pi(y_c|x) / |y_c|)
    """
    if nll_weight == 0:
        return output
    nll = -chosen_logps / chosen_token_counts.clamp_min(1)
    return LossOutput(output.losses + nll_weight * nll, output.weights, {**output.metrics, "nll": nll.detach()})


# ---- reference-free pairwise losses ------------------------------------------------------------------------


def slic(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_token_counts: Tensor,
    weights: Tensor,
    beta: float,
    margin: float,
    nll_weight: float,
) -> LossOutput:
    """SLiC-HF (Zhao et al. 2023): a calibration hinge plus an NLL regulariser on the chosen response.

        l_i = max(0, margin - beta * (log pi(y_c|x) - log pi(y_r|x))) + nll_weight * (-log pi(y_c|x) / |y_c|)

    The regulariser is the per-token NLL so that its scale does not grow with the response length.
    """
    hinge = torch.relu(margin - beta * (policy_chosen_logps - policy_rejected_logps))
    nll = -policy_chosen_logps / chosen_token_counts.clamp_min(1)
    losses = hinge + nll_weight * nll
    metrics = _pair_metrics(
        beta * policy_chosen_logps, beta * policy_rejected_logps, policy_chosen_logps, policy_rejected_logps
    )
    metrics["nll"] = nll.detach()
    return LossOutput(losses, weights, metrics)


def simpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_token_counts: Tensor,
    rejected_token_counts: Tensor,
    weights: Tensor,
    beta: float,
    gamma: float,
) -> LossOutput:
    """SimPO (Meng et al. 2024): reference-free, on length-normalised log-probs, with a target margin gamma.

        r(y) = beta * log pi(y|x) / |y|
        l_i = -log sigmoid(r(y_c) - r(y_r) - gamma)
    """
    chosen_rewards = beta * policy_chosen_logps / chosen_token_counts.clamp_min(1)
    rejected_rewards = beta * policy_rejected_logps / rejected_token_counts.clamp_min(1)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    metrics = _pair_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)
    return LossOutput(losses, weights, metrics)


# ---- pointwise feedback --------------------------------------------------------------------------------------


def kto_kl_estimate(
    mismatched_policy_logps: Tensor,
    mismatched_reference_logps: Tensor,
    across_processes: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """KTO's reference point z0: the batch mean of log pi(y_j|x_i) - log ref(y_j|x_i) over mismatched
    pairs (response j under another sample's prompt i), detached and clamped at 0 (KTO paper, sec. 4.1;
    HALOs' KTOTrainer). `across_processes` averages the mean over processes, before the clamp."""
    mean = (mismatched_policy_logps - mismatched_reference_logps).mean().detach()
    if across_processes is not None:
        mean = across_processes(mean)
    return mean.clamp_min(0)


def kto(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    kl_estimate: Tensor,
    weights: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024) on pointwise desirable/undesirable feedback.

        r_i = log pi(y_i|x_i) - log ref(y_i|x_i),   z0 = kl_estimate (detached, >= 0)
        l_i = lambda_D * (1 - sigmoid(beta * (r_i - z0)))   if y_i is desirable
        l_i = lambda_U * (1 - sigmoid(beta * (z0 - r_i)))   if y_i is undesirable
    """
    desirable = desirable.bool()
    kl_estimate = kl_estimate.detach()
    logratios = policy_logps - reference_logps
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl_estimate)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl_estimate - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = beta * logratios
    nan = torch.full_like(rewards, float("nan"))
    metrics = _detached(
        chosen_reward=torch.where(desirable, rewards, nan),
        rejected_reward=torch.where(desirable, nan, rewards),
        chosen_logp=torch.where(desirable, policy_logps, nan),
        rejected_logp=torch.where(desirable, nan, policy_logps),
        kl=kl_estimate.expand_as(rewards),
    )
    return LossOutput(losses, weights, metrics)


def rl(
    policy_logps: Tensor,
    reference_logps: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    weights: Tensor,
    kl_coef: float,
) -> LossOutput:
    """REINFORCE with a leave-one-out baseline (RLOO, Ahmadian et al. 2024) and a KL penalty to the reference.

        s_i = reward_i - kl_coef * (log pi(y_i|x) - log ref(y_i|x))          (shaped reward, detached)
        A_i = s_i - mean_{j in group(i), j != i} s_j                          (leave-one-out baseline)
        l_i = -A_i * log pi(y_i|x)

    A group is the samples of one prompt (`group_ids`); each needs at least two samples in the batch. The
    baseline is the plain mean of the other samples' shaped rewards: weights scale each sample's own term.
    """
    group_sizes = torch.zeros_like(rewards).index_add_(0, group_ids, torch.ones_like(rewards))[group_ids]
    if (group_sizes < 2).any():
        lonely = sorted(set(group_ids[group_sizes < 2].tolist()))
        raise ValueError(
            f"rl: every prompt needs >= 2 samples in the batch for the baseline; groups {lonely} have 1"
        )
    kl = (policy_logps - reference_logps).detach()
    shaped = rewards - kl_coef * kl
    group_totals = torch.zeros_like(shaped).index_add_(0, group_ids, shaped)[group_ids]
    advantages = shaped - (group_totals - shaped) / (group_sizes - 1)
    losses = -advantages * policy_logps
    metrics = _detached(
        reward=rewards, shaped_reward=shaped, advantage=advantages, kl=kl, chosen_logp=policy_logps
    )
    return LossOutput(losses, weights, metrics)


# ---- the table the Trainer reads ------------------------------------------------------------------------------


@dataclass
class LossInput:
    """What the Trainer hands a loss for one micro-batch. Per-sequence tensors hold the chosen rows first and
    then the rejected ones for a two-response loss (`pair` splits them); a field the loss does not declare in
    its `LossSpec` is None."""

    policy_logps: Tensor  # [n*B] summed response log-probs under the policy (a reward model: its scores)
    token_counts: Tensor  # [n*B] response tokens per sequence
    weights: Tensor  # [B] sample weights (generation1_weight)
    reference_logps: Tensor | None = None  # [n*B] the same under the reference (LossSpec.reference)
    rewards: Tensor | None = None  # [B] generation1_reward: a label (kto) or a scalar reward (rl)
    group_ids: Tensor | None = None  # [B] one id per prompt (LossSpec.grouped)
    kl_estimate: Tensor | None = None  # KTO's z0 from mismatched pairs (LossSpec.mismatched_kl)

    @staticmethod
    def pair(values: Tensor) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) halves of a two-response tensor."""
        return values.chunk(2)


@dataclass(frozen=True)
class LossSpec:
    """A loss and what it needs. `compute(inputs, training_config)` binds its hyper-parameters."""

    name: str
    compute: Callable[[LossInput, object], LossOutput]
    responses: int = 1  # 2: a (chosen, rejected) pair per example
    reference: bool = False  # needs the reference model's log-probs
    reward_head: bool = False  # trains a reward model (one score per sequence) instead of a causal LM
    grouped: bool = False  # needs every sample of a prompt in one micro-batch (group_ids)
    mismatched_kl: bool = False  # needs KTO's KL estimate from mismatched (prompt, response) pairs


def _pair_args(x: LossInput) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """policy chosen, policy rejected, reference chosen, reference rejected."""
    return (*x.pair(x.policy_logps), *x.pair(x.reference_logps))


def _chosen_nll(output: LossOutput, x: LossInput, c) -> LossOutput:
    return with_chosen_nll(output, x.pair(x.policy_logps)[0], x.pair(x.token_counts)[0], c.chosen_nll_weight)


LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("sft", lambda x, c: sft(x.policy_logps, x.token_counts, x.weights)),
    LossSpec("reward", lambda x, c: reward(*x.pair(x.policy_logps), x.weights, margin=c.reward_margin),
             responses=2, reward_head=True),
    LossSpec("dpo", lambda x, c: _chosen_nll(dpo(*_pair_args(x), x.weights, c.beta), x, c),
             responses=2, reference=True),
    LossSpec("cdpo", lambda x, c: _chosen_nll(cdpo(*_pair_args(x), x.weights, c.beta, c.label_smoothing), x, c),
             responses=2, reference=True),
    LossSpec("ipo", lambda x, c: _chosen_nll(ipo(*_pair_args(x), *x.pair(x.token_counts), x.weights, c.beta), x, c),
             responses=2, reference=True),
    LossSpec("slic", lambda x, c: slic(*x.pair(x.policy_logps), x.pair(x.token_counts)[0], x.weights, c.beta,
                                       c.slic_margin, c.slic_nll_weight), responses=2),
    LossSpec("simpo", lambda x, c: simpo(*x.pair(x.policy_logps), *x.pair(x.token_counts), x.weights, c.beta,
                                         c.simpo_gamma), responses=2),
    LossSpec("kto", lambda x, c: kto(x.policy_logps, x.reference_logps, x.rewards == 1, x.kl_estimate, x.weights,
                                     c.beta, c.kto_desirable_weight, c.kto_undesirable_weight),
             reference=True, mismatched_kl=True),
    LossSpec("rl", lambda x, c: rl(x.policy_logps, x.reference_logps, x.rewards.float(), x.group_ids, x.weights,
                                   c.rl_kl_coef), reference=True, grouped=True),
)}
