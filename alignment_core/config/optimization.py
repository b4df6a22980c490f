"""The config sections of a training round and of its held-out evaluation."""

from typing import Literal

from pydantic import Field, model_validator

from alignment_core.config.common import MAX_BATCH, MAX_COUNT, MAX_TOKENS, Loss, StrictModel, check_prompt_fits

CHOSEN_NLL_LOSSES = ("dpo", "cdpo", "ipo")  # the losses `chosen_nll_weight` adds to (alignment_core.losses)

__all__ = [  # what the package re-exports
    "EvaluationConfig",
    "TrainingConfig",
]


class TrainingConfig(StrictModel):
    loss: Loss = "dpo"
    """The loss; must fit the setup (README: The seven learning setups)."""
    beta: float = Field(default=0.1, gt=0)
    """Strength of the KL regularisation towards the reference (dpo family, kto)."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """cdpo"""
    reward_margin: float = Field(default=0.0, ge=0)
    """reward model: -log sigmoid(r_chosen - r_rejected - margin)"""
    slic_margin: float = Field(default=1.0, ge=0)
    """slic: max(0, margin - beta * (logp_chosen - logp_rejected))"""
    simpo_gamma: float = Field(default=0.5, ge=0)
    """simpo: target reward margin."""
    slic_nll_weight: float = Field(default=0.1, ge=0)
    """slic: weight of the chosen response's NLL term."""
    chosen_nll_weight: float = Field(default=0.0, ge=0)
    """dpo, cdpo, ipo: adds this times the chosen response's per-token NLL (RPO, Pang et al. 2024; TRL's
    rpo_alpha, 1.0 in the paper). Keeps the chosen answers likely: iterative DPO on its own samples otherwise can
    push the likelihood of both answers down until the policy writes repetitions and broken words. At 1.0 it slowed
    every arm of experiments/online_vs_offline.py (experiments/RESULTS.md)."""
    kto_desirable_weight: float = Field(default=1.0, gt=0)
    """kto: weight of desirable examples."""
    kto_undesirable_weight: float = Field(default=1.0, gt=0)
    """kto: weight of undesirable examples."""
    rl_kl_coef: float = Field(default=0.05, ge=0)
    """rl: KL penalty coefficient of the shaped reward."""
    learning_rate: float = Field(default=5e-5, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    epochs: int = Field(default=1, gt=0, le=1000)
    """Passes over this round's data."""
    batch_size: int = Field(default=8, gt=0, le=MAX_BATCH)
    """per process"""
    gradient_accumulation_steps: int = Field(default=1, gt=0, le=MAX_BATCH)
    """Micro-batches per optimizer step."""
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    """Fraction of the round's steps spent warming up the learning rate."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    """Gradient clipping norm."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """accelerate's mixed precision (bf16 on recent GPUs)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass (less memory, slower). None: on when training through an
    adapter (model.adapter: LoRA's peak is then the frozen weights and the activations, and recomputing takes
    a third off it), off for full fine-tuning (whose peak is the optimizer step, which recomputing does not
    lower). Measurements: docs/benchmarks.md."""
    padding_free: bool | None = None
    """One forward per micro-batch over its sequences laid end to end, without padding (position ids restart at
    each sequence, so attention stays within it): the log-probs and gradients of padded rows without computing
    padding. Checked once per round against padded rows; a model whose attention mixes packed sequences falls
    back to padded rows, with a warning. None: on with flash attention (variable-length kernels) and flex
    attention (block-sparse masks), whose cost is what the sequences cost: every micro-batch is then one row; off
    with sdpa and eager, which compute a packed row as a masked square that costs what the padding saved
    (measurements: docs/benchmarks.md). Off: padded rows, `rows_per_forward` at a time."""
    rows_per_forward: int | None = Field(default=None, ge=0, le=MAX_BATCH)
    """Without padding_free: rows per forward pass (with prefix_sharing a row is a pair); 0: every row of a
    micro-batch in one forward. On CPUs a few rows sorted by length waste far fewer padded tokens; a micro-batch is
    split only where that removes enough padding to pay for the extra forwards (rows of similar lengths stay in
    one). None: 4 on a CPU, 0 on an accelerator."""
    prefix_sharing: bool | None = None
    """Pairwise losses without padding_free: each pair's prompt computed once, the pair one row (prompt, response
    1, response 2, which a block mask keeps from seeing response 1; its positions continue from the prompt's): the
    log-probs and gradients of the pair's two padded rows, without the second copy of the prompt. Checked once per
    round against padded rows; a model whose attention ignores the mask falls back to them, with a warning; so
    does a micro-batch whose pairs' prompts differ (one truncated to fit its response). None: on when training on a
    CPU (sdpa and eager; measured: docs/benchmarks.md), off on an accelerator, where it was not measured."""
    precompute_reference: bool = True
    """Compute reference log-probs once before training (the reference then leaves memory)."""
    reference_from_sampler: bool = True
    """Use the generation stage's log-probs as the reference log-probs, skipping the reference forward, for the
    responses whose sampling model is the reference (same digest: iteration 1 from the initial policy, or a
    reference that is the behaviour policy) and whose tokens training sees untruncated. Exact up to float
    rounding: the sampler records raw log-probs (before temperature and top-p). Other rows take the reference
    forward as before."""
    max_length: int = Field(default=256, gt=0, le=MAX_TOKENS)
    """Longest prompt + response in tokens; longer ones are truncated."""
    max_prompt_length: int = Field(default=128, gt=0, le=MAX_TOKENS)
    """Longest prompt in tokens."""
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    """Which end of a too-long prompt to keep."""
    seed: int = 0
    """Seed of the batch order."""
    bootstrap_seed: int | None = None
    """Train on a bootstrap resample of the round's units (as many draws with replacement as there are units),
    drawn with this seed: reward models of an ensemble, each with its own seed, learn from different samples of
    the same data. Unset: every unit once per epoch."""
    save_every_steps: int = Field(default=0, ge=0, le=MAX_COUNT)
    """0: save only at the end of the round"""
    num_processes: int | None = Field(default=None, gt=0, le=4096)
    """Processes the round trains on. More than one: the round runs under `accelerate launch` (DDP, DeepSpeed or
    FSDP per the accelerate config file; deployments/accelerate/ ships some). Unset: the `num_processes` of
    `accelerate_config`, 1 without one; set, it overrides the file's."""
    accelerate_config: str | None = None
    """accelerate config file (deployments/accelerate/). Once named, the round always runs under `accelerate launch`
    with it, also with one process (FSDP or DeepSpeed offload on a single GPU), on the file's `num_processes`
    unless `num_processes` is set."""

    @model_validator(mode="after")
    def _prompt_fits(self) -> "TrainingConfig":
        check_prompt_fits(self.max_prompt_length, self.max_length)
        if self.loss == "kto" and self.batch_size < 2:
            raise ValueError("loss 'kto' needs batch_size >= 2 for its mismatched KL pairs")
        if self.chosen_nll_weight and self.loss not in CHOSEN_NLL_LOSSES:
            raise ValueError(f"training.chosen_nll_weight applies to the losses {CHOSEN_NLL_LOSSES}, not "
                             f"{self.loss!r}" + (" (it has slic_nll_weight)" if self.loss == "slic" else ""))
        return self


class EvaluationConfig(StrictModel):
    """Held-out prompts, the new policy against the previous and the initial one, judged by the annotator."""

    enabled: bool = True
    """Evaluate each iteration on held-out prompts."""
    max_new_tokens: int = Field(default=32, gt=0, le=MAX_TOKENS)
    """Longest held-out response, in tokens."""
    temperature: float = Field(default=0.7, ge=0)
    """Sampling temperature of held-out responses."""
    oracle: str | None = None
    """module:function true reward to report beside the annotator (experiments)"""
