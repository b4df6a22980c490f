"""One training round: a policy (or a reward model) trained on encoded examples with one of `losses`.

    trainer = Trainer(cfg, policy_path="tiny://llama", tokenizer_path=None, store=store)
    encoded = trainer.batch_factory.encode(units_df, weights_df)
    result = trainer.train(encoded, checkpoint_uri, metrics_uri)

How a round runs, top to bottom (`Trainer.setup`, then `Trainer.train`):
1. Plan every optimizer step up front: a seeded permutation per epoch, cut into global batches of
   `batch_size * num_processes * gradient_accumulation_steps` examples, each split into one micro-batch per
   (process, accumulation step); a loss that needs per-prompt groups (rl) keeps a prompt's samples together.
   The plan depends only on the data and the config, so a resumed round and a round on a different number of
   processes see the same global batches.
2. Resume: a resume point at `checkpoint_uri` written by the same round (same fingerprint) restores the
   weights, the optimizer, the scheduler and the step; the plan's first `step` batches are skipped.
3. Reference log-probs (the losses whose row in `losses.LOSSES` asks for them): precomputed in one pass and
   added to the examples as a `reference_logps` column (`training.precompute_reference`), or computed on the
   fly per micro-batch. With a LoRA adapter (`model.adapter`) whose base model is the reference, the
   reference is the policy with its adapter switched off: no second copy of the weights (adapters.py).
   Where the reference is the model that sampled an online example's responses, the sampler's raw log-probs
   are its reference log-probs and no forward runs for it (`training.reference_from_sampler`).
4. Each step: the loss of every micro-batch (one call of the loss's row) is sum_i w_i l_i over its samples
   divided by the sum of the weights of the whole global batch (all micro-batches, all processes), so
   gradients equal those of one big batch whatever the split. A non-finite loss or gradient norm raises
   NonFiniteLossError before `optimizer.step`, and nothing is saved from that state.
5. Metrics per step go to a metrics stage (records.METRICS, long format); a checkpoint (safetensors +
   tokenizer + config, no pickle) at the end, and every `training.save_every_steps` steps a resume point
   that adds the optimizer/scheduler state as safetensors + JSON.

The package, one job per module: `plan.py` (the step plan), `state.py` (optimizer state and resume files without
pickle), `engines.py` (what plain DDP, FSDP and DeepSpeed do differently), `models.py` (the policy and reference it
loads), `reference.py` (precomputed reference log-probs, the sampler's where exact), `trainer.py` (the
Trainer), `rounds.py` (a round under `accelerate launch`, or carried over; the launched entry point).

Multi-process runs go through `accelerate launch ... -m alignment_core.training` (see `rounds.main` and
deployments/accelerate/README.md; on CPU: `accelerate launch --config_file
deployments/accelerate/cpu_ddp_2proc.yaml -m alignment_core.training ...`).
"""

from alignment_core.training.plan import *  # noqa: F403  (its __all__)
from alignment_core.training.state import *  # noqa: F403  (its __all__)
from alignment_core.training.trainer import *  # noqa: F403  (its __all__)
