"""The Trainer: one round of training on encoded examples with one of `losses` (the package docstring walks
through a round, top to bottom)."""

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from transformers import get_scheduler

from alignment_core import gpu, losses
from alignment_core.batches import BatchFactory, prompt_groups
from alignment_core.config import PipelineConfig
from alignment_core.logprobs import concatenated_inputs, mismatched_inputs, sequence_logps
from alignment_core.models import DTYPES, load_tokenizer
from alignment_core.progress import bar as progress_bar
from alignment_core.records import METRICS, from_rows
from alignment_core.store import ArtifactStore
from alignment_core.training.engines import engine_for
from alignment_core.training.models import RoundModels
from alignment_core.training.plan import bootstrap_sample, plan_steps
from alignment_core.training.reference import ReferenceLogps
from alignment_core.training.state import (
    OPTIMIZER_SCALARS,
    OPTIMIZER_TENSORS,
    SCHEDULER_STATE,
    TRAINER_STATE,
    examples_digest,
    optimizer_state_files,
    optimizer_state_from_files,
)

__all__ = [  # what the package re-exports
    "CPU_ROWS_PER_FORWARD",
    "NonFiniteLossError",
    "LAYOUT_TOLERANCE",
    "TrainResult",
    "Trainer",
]

logger = logging.getLogger(__name__)

# Packed and padded forwards differ by rounding only; sequences that see each other differ by far more. Measured
# (largest |packed - padded| per response token, every sequence of a micro-batch packed into one row): tiny random
# GPT-2/Qwen2/Mistral/Gemma2/Phi-3/GPT-NeoX 1e-6 in fp32, up to 5e-5 in bf16 weights; the SFT'd tiny Llama in bf16
# 2.3e-4; OPT, whose decoder ignores the restarting position ids, 2.9e-2 (1.4e-3 in rows as wide as the longest).
LAYOUT_TOLERANCE = 1e-3  # nats per response token: packed or prefix-shared forwards against padded rows
CPU_ROWS_PER_FORWARD = 4  # measured best of 1/2/4/8 on 2 CPU cores (benchmarks/train_throughput.py)


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) of an optimizer step is NaN or infinite; the step was not applied."""

    def __init__(self, step: int, loss: float, what: str = "loss"):
        self.step, self.loss = step, loss
        super().__init__(
            f"non-finite {what} at optimizer step {step}: {loss}. The step was not applied and no checkpoint "
            "was written from this state; try a lower learning rate, mixed_precision='no', or check the data."
        )


@dataclass
class TrainResult:
    checkpoint_uri: str
    steps: int
    metrics: dict[str, float]  # the last step's metrics
    tokens_per_s: float  # policy-forward tokens (prompt + response, no padding) per second of training


class Trainer(RoundModels, ReferenceLogps):
    """Trains `policy_path` for one round with `cfg.training.loss` (see the module docstring).

    Its lifecycle, in reading order: `__init__` (configuration only: tokenizer, batch factory, accelerator,
    the loss's row of `losses.LOSSES`), `setup` (everything the loop needs, created in one place: the step
    plan and the round's fingerprint, the resume state, the model, reference, optimizer and scheduler, and
    the precomputed reference log-probs as a column of the examples), `train` (the loop), `release`.
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        policy_path: str,
        tokenizer_path: str | None,
        store: ArtifactStore,
        reference_path: str | None = None,
        policy_name: str | None = None,
    ):
        """`policy_name` is the policy as the config names it (hub id, tiny://, store URI): a new adapter
        records it as its base, so that another machine resolves it; defaults to `policy_path`. The config's
        own rules (loss vs setup, KTO's batch size) were checked when it loaded."""
        self.cfg, self.store = cfg, store
        self.loss_spec = losses.LOSSES[cfg.training.loss]  # the loss's row of the table
        self.policy_path = policy_path
        self.policy_name = policy_name or policy_path
        # The reference is the policy the round starts from unless configured otherwise.
        self.reference_path = reference_path or cfg.model.reference or policy_path
        self.tokenizer = load_tokenizer(
            tokenizer_path or cfg.model.tokenizer or policy_path, trust_remote_code=cfg.model.trust_remote_code,
            store=store,
        )
        self.batch_factory = BatchFactory.from_config(self.tokenizer, cfg)
        # Launched as several processes without CUDA (torchrun / `accelerate launch --multi_gpu`): ask for the
        # CPU, which makes accelerate use DDP over gloo. (accelerate's `--cpu` launcher needs MPI for that.)
        multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # accelerate keeps one process-wide state, fixed by the first Accelerator: a second round in the
            # same process (a notebook, a served flow) with another `mixed_precision` would be refused.
            AcceleratorState._reset_state()
        self.accelerator = Accelerator(mixed_precision=cfg.training.mixed_precision, cpu=multi_process_cpu)
        self.engine = engine_for(self.accelerator, cfg)  # what DDP, FSDP or DeepSpeed does its own way
        # Flash attention's variable-length kernels and flex attention's block-sparse masks cost what the sequences
        # cost: one row of everything.
        attention = cfg.model.attn_implementation or ""
        self.one_row = "flash" in attention or attention == "flex_attention"
        padding_free = cfg.training.padding_free
        # `setup` checks it and may turn it off; a reward model scores the last token of padded rows.
        self.packed = (self.one_row if padding_free is None else padding_free) and not self.loss_spec.reward_head
        self.rows_per_forward = cfg.training.rows_per_forward
        if self.rows_per_forward is None:
            self.rows_per_forward = CPU_ROWS_PER_FORWARD if self.accelerator.device.type == "cpu" else 0
        # Pairs of responses: each prompt computed once (`setup` checks it). None: on a CPU, where it was measured.
        prefix_sharing = cfg.training.prefix_sharing
        self.prefix_sharing = ((self.accelerator.device.type == "cpu" if prefix_sharing is None else prefix_sharing)
                               and len(self.batch_factory.generations) == 2 and not self.packed
                               and not self.loss_spec.reward_head)
        self.additive_mask = None  # the dtype of eager attention's additive mask (`setup`), None for sdpa's
        # Created by `setup`:
        self.plan: list[list[list[int]]] = []  # every optimizer step's micro-batches (example indices)
        self.fingerprint = ""  # the round's identity: a checkpoint of another round is not resumed
        self.step = 0  # optimizer steps done (> 0 when resumed)
        self.resumed: dict = {}  # the resume point's trainer state ({} when starting over)
        self.examples: list[dict] = []  # the encoded examples, with reference_logps when precomputed
        self.model = self.reference = self.optimizer = self.scheduler = None
        self.reference_is_base = False  # the reference is the policy with its adapter off
        self.seconds: dict[str, float] = {}  # where the round's time went: load, reference, train, save
        self.reference_rows_from_sampler = 0  # examples whose reference log-probs are the sampler's

    # ---- setup: everything the loop needs ----
    def setup(self, encoded: list[dict], checkpoint_uri: str, resume: bool = True,
              fingerprint: str | None = None) -> None:
        """Plan the steps, find a resume point of this round, then (unless the round is already finished)
        load the models and optimizer, restore their state, and precompute the reference log-probs.

        `fingerprint` identifies the round (the pipeline passes the digest of its lineage fingerprint, so one
        fingerprint decides whether a round is done); by default it is derived from the config, the models and
        the examples (`round_fingerprint`).
        """
        tc, accelerator = self.cfg.training, self.accelerator
        started, self.seconds = time.perf_counter(), {}
        set_seed(tc.seed)
        micro_batches = accelerator.num_processes * tc.gradient_accumulation_steps
        units = prompt_groups(encoded) if self.loss_spec.grouped else [[i] for i in range(len(encoded))]
        if tc.bootstrap_seed is not None:  # a unit drawn twice is trained on twice per epoch, one never drawn not
            units = [units[i] for i in bootstrap_sample(len(units), tc.bootstrap_seed)]
        self.plan = plan_steps(units, tc.batch_size * micro_batches, micro_batches, tc.epochs, tc.seed)
        self.fingerprint = fingerprint or self.round_fingerprint(encoded)
        self.resumed = (self._resumable_state(checkpoint_uri, self.fingerprint) if resume else None) or {}
        self.step = self.resumed.get("step", 0)
        self.examples = encoded
        if self.finished:
            return
        gpu.reset_peak_memory()
        self.engine.configure()
        self.model = self._load_policy(self.resumed.get("local_dir", self.policy_path))
        if self.loss_spec.reference:
            self.examples = self._with_sampler_reference_logps(encoded)
        self.reference = self._load_reference() if self._needs_reference_model() else None
        optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=tc.learning_rate,
            weight_decay=tc.weight_decay,
        )
        self.scheduler = get_scheduler(
            "constant_with_warmup" if tc.scheduler == "constant" else tc.scheduler, optimizer,
            num_warmup_steps=self._warmup_steps(), num_training_steps=len(self.plan),
        )
        # The scheduler stays unprepared: accelerate would step it once per process.
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        if self.resumed:
            local = Path(self.resumed["local_dir"])
            if (local / OPTIMIZER_TENSORS).exists():
                self.engine.load_optimizer_state(self.model, self.optimizer, optimizer_state_from_files(
                    (local / OPTIMIZER_TENSORS).read_bytes(), (local / OPTIMIZER_SCALARS).read_bytes()))
            else:
                logger.warning("resume point %s has no optimizer state (DeepSpeed's is not saved): the optimizer's "
                               "moments start afresh at step %d", checkpoint_uri, self.step)
            self.scheduler.load_state_dict(json.loads((local / SCHEDULER_STATE).read_text()))
            logger.info("resuming %s at step %d of %d", checkpoint_uri, self.step, len(self.plan))
        if self.packed:
            # Every sequence of the first micro-batch in one row, so that each but the first has others before it
            # to see (in rows as wide as the longest, a micro-batch of similar lengths gets a row each).
            self.packed = self._matches_padded(encoded, "padding_free", "packing",
                                               "its attention does not keep the sequences apart",
                                               packed=True, one_row=True)
        if self.prefix_sharing:
            if self.model_unwrapped.config._attn_implementation == "eager":
                self.additive_mask = DTYPES[self.cfg.model.dtype]
            self.prefix_sharing = self._matches_padded(
                encoded, "prefix_sharing", "sharing prompts", "its attention ignores the mask or the positions",
                prefix_sharing=True, additive_mask=self.additive_mask)
        self.seconds["load"] = time.perf_counter() - started
        if self.loss_spec.reference and tc.precompute_reference:
            self.examples = self._with_reference_logps(self.examples)
        self.seconds["reference"] = time.perf_counter() - started - self.seconds["load"]

    def _needs_reference_model(self) -> bool:
        """Whether any forward of the reference is left to run: not when the sampler's log-probs are every
        example's (the round then never loads it: a model load saved, and its memory) and the loss takes no
        estimate from it (KTO's mismatched-pair KL)."""
        if not self.loss_spec.reference:
            return False
        return self.loss_spec.mismatched_kl or any("reference_logps" not in example for example in self.examples)

    def _warmup_steps(self) -> int:
        """`warmup_ratio` of the round's steps, leaving at least one step after the warm-up: the first step of
        a warm-up has learning rate 0, so a round that is all warm-up (one step, say) would train nothing."""
        steps, warmup = len(self.plan), math.ceil(self.cfg.training.warmup_ratio * len(self.plan))
        if warmup and warmup >= steps:
            logger.warning("training.warmup_ratio %.2g of a %d-step round would leave no step after the warm-up "
                           "(its first step has learning rate 0); warming up over %d", self.cfg.training.warmup_ratio,
                           steps, steps - 1)
            return steps - 1
        return warmup

    def round_fingerprint(self, encoded: list[dict]) -> str:
        """The round's identity without a pipeline: config, setup, models and the examples' tokens."""
        return hashlib.sha256(json.dumps({
            "config": self.cfg.stage_hash("training", "model"), "setup": self.cfg.setup,
            "policy": self.policy_path, "reference": self.reference_path, "examples": examples_digest(encoded),
            "processes": self.accelerator.num_processes,
        }, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def finished(self) -> bool:
        return self.step >= len(self.plan)

    # ---- train: the loop ----
    def train(
        self,
        encoded_examples: list[dict],
        checkpoint_uri: str,
        metrics_uri: str,
        resume: bool = True,
        progress_callback: Callable[[int, int, dict], None] | None = None,
        fingerprint: str | None = None,
    ) -> TrainResult:
        """Run the round: `setup`, then every planned step not done yet, with a metrics shard and a checkpoint
        every `training.save_every_steps` steps and at the end."""
        accelerator, save_every = self.accelerator, self.cfg.training.save_every_steps
        round_started = time.perf_counter()
        self.setup(encoded_examples, checkpoint_uri, resume, fingerprint)
        total = len(self.plan)
        metrics_writer = None
        if accelerator.is_main_process:
            metrics_writer = self.store.stage_writer(metrics_uri, "metrics", {"round": self.fingerprint})
        if self.finished:  # this round already finished; only the manifest may be missing
            if metrics_writer is not None:
                metrics_writer.finish({"steps": total, "checkpoint_uri": checkpoint_uri,
                                       "final": self.resumed["metrics"], "tokens_per_s": self.resumed["tokens_per_s"]})
            accelerator.wait_for_everyone()
            return TrainResult(checkpoint_uri, total, self.resumed["metrics"], self.resumed["tokens_per_s"])

        last_metrics, shards = self.resumed.get("metrics", {}), self.resumed.get("metrics_shards", 0)
        pending_rows: list[dict] = []
        tokens_seen, self.seconds["train"] = 0.0, 0.0
        self.model.train()
        bar = progress_bar(total=total, initial=self.step, desc=f"train {self.loss_spec.name}",
                           disable=not accelerator.is_main_process)
        with bar as progress:  # closed on errors too, so no half bar is printed when the process exits
            while not self.finished:
                started = time.perf_counter()
                mine = self.plan[self.step][accelerator.process_index :: accelerator.num_processes]
                metrics, tokens = self._train_step([self._collate(self.examples, m) for m in mine], self.step + 1)
                seconds = time.perf_counter() - started
                self.step += 1
                tokens_seen, self.seconds["train"] = tokens_seen + tokens, self.seconds["train"] + seconds
                metrics["tokens_per_s"] = tokens / seconds
                last_metrics = metrics
                pending_rows += [{"step": self.step, "split": "train", "metric": k, "value": v}
                                 for k, v in metrics.items()]
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}")
                if self.finished or (save_every and self.step % save_every == 0):
                    # Metrics first, then the checkpoint that records how many metric shards it covers.
                    if metrics_writer is not None:
                        metrics_writer.write_shard(shards, from_rows(pending_rows, METRICS))
                    shards, pending_rows = shards + 1, []
                    self._save(checkpoint_uri, {"fingerprint": self.fingerprint, "step": self.step,
                                                "total_steps": total, "metrics": last_metrics,
                                                "metrics_shards": shards,
                                                "tokens_per_s": tokens_seen / self.seconds["train"]},
                               final=self.finished)
                if progress_callback is not None and accelerator.is_main_process:
                    progress_callback(self.step, total, metrics)
        # The rest of the round's time: metric shards and checkpoints (`train` is what `tokens_per_s` divides by).
        self.seconds["save"] = time.perf_counter() - round_started - sum(self.seconds.values())
        tokens_per_s = tokens_seen / self.seconds["train"]
        if metrics_writer is not None:
            metrics_writer.finish({"steps": total, "checkpoint_uri": checkpoint_uri, "final": last_metrics,
                                   "tokens_per_s": tokens_per_s, "padding_free": self.packed,
                                   "prefix_sharing": self.prefix_sharing,
                                   "gradient_checkpointing": self.gradient_checkpointing,
                                   "reference_rows_from_sampler": self.reference_rows_from_sampler,
                                   "reference_rows_forward": len(self.examples) - self.reference_rows_from_sampler
                                   if self.loss_spec.reference else 0,
                                   "reference_model_loaded": self.reference is not None or self.reference_is_base,
                                   "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                                   "peak_gpu_memory_gib": gpu.peak_memory_gib()})
        accelerator.wait_for_everyone()
        return TrainResult(checkpoint_uri, total, last_metrics, tokens_per_s)

    def release(self) -> None:
        """Drop the model, reference and optimizer and give their memory back (the next stage may need the
        GPU); the Trainer cannot train again after this."""
        self.model = self.reference = self.optimizer = self.scheduler = None
        self.examples = []
        self.accelerator.free_memory()
        gpu.release_memory()

    def _train_step(self, micro_batches: list[dict], step: int) -> tuple[dict[str, float], float]:
        """Forward/backward over this process's micro-batches, then one optimizer step; returns the metrics
        (averaged over all processes) and the number of policy-forward tokens of all processes."""
        accelerator = self.accelerator
        weights = torch.stack([b["generation1_weight"].float().sum() for b in micro_batches]).sum()
        weight_total = accelerator.reduce(weights, reduction="sum")
        if weight_total.item() <= 0:
            logger.warning("step %d: every sample weight is 0; the step changes nothing but the optimizer state",
                           step)
        # DDP averages gradients over processes: multiplying by their number makes the sum over the global batch.
        scale = accelerator.num_processes / torch.where(weight_total > 0, weight_total, torch.ones_like(weight_total))
        loss_sum = torch.zeros((), device=accelerator.device)
        metric_sums: dict[str, torch.Tensor] = {}
        metric_counts: dict[str, torch.Tensor] = {}
        tokens = torch.zeros((), device=accelerator.device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # DeepSpeed steps its optimizer in the `backward` of a micro-batch with sync_gradients set: the last.
            accelerator.sync_gradients = last
            with nullcontext() if last else accelerator.no_sync(self.model):
                out = self.compute_loss(batch)
                weighted_sum = (out.weights * out.losses).sum()
                accelerator.backward(weighted_sum * scale, **self.engine.backward_kwargs)
            loss_sum += weighted_sum.detach()
            for name, values in out.metrics.items():
                defined = ~torch.isnan(values)
                metric_sums[name] = metric_sums.get(name, 0) + torch.where(defined, values, 0).sum()
                metric_counts[name] = metric_counts.get(name, 0) + defined.sum()
            tokens += sum(batch[f"{n}_attention_mask"].sum() for n in self.batch_factory.generations)

        names = sorted(metric_sums)
        local = torch.stack([loss_sum, tokens, *(metric_sums[n] for n in names), *(metric_counts[n] for n in names)])
        totals = accelerator.reduce(local.float(), reduction="sum").tolist()
        weight_sum = weight_total.item()
        loss = totals[0] / (weight_sum if weight_sum > 0 else 1.0)
        if not math.isfinite(loss):
            raise NonFiniteLossError(step, loss)
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.training.max_grad_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else math.nan
        if not math.isfinite(grad_norm) and self.cfg.training.mixed_precision != "fp16":
            # (fp16's loss scaler skips steps with overflowing gradients by itself.)
            raise NonFiniteLossError(step, grad_norm, what="gradient norm")
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate}
        counts = totals[2 + len(names) :]
        for name, total, count in zip(names, totals[2 : 2 + len(names)], counts, strict=True):
            if count > 0:
                metrics[name] = total / count
        return metrics, totals[1]

    def compute_loss(self, batch: dict) -> losses.LossOutput:
        """The configured loss of one micro-batch (already on the device): one call of its `losses.LOSSES`
        row, on a `LossInput` holding what that row declares it needs."""
        logps, counts = self.concatenated_forward(self.model, batch)
        inputs = losses.LossInput(logps, counts, batch["generation1_weight"].float(),
                                  rewards=batch["generation1_reward"])
        if self.loss_spec.reference:
            inputs.reference_logps = self._reference_logps(batch)
        if self.loss_spec.mismatched_kl:
            inputs.kl_estimate = self._kto_kl_estimate(batch)
        if self.loss_spec.grouped:
            group_of = {prompt_id: index for index, prompt_id in enumerate(dict.fromkeys(batch["prompt_id"]))}
            inputs.group_ids = torch.tensor([group_of[p] for p in batch["prompt_id"]], device=logps.device)
        return self.loss_spec.compute(inputs, self.cfg.training)

    # ---- forward passes ----
    def concatenated_forward(self, model, batch: dict):
        """One forward over generation1 (+ generation2) stacked along the batch.

        Causal LMs: (summed response log-probs [n*B], response token counts [n*B]). Reward models: the
        scalar scores [n*B] and the counts. Chosen rows come first, then rejected ones.
        """
        token_ids, attention, responses = concatenated_inputs(batch, self.batch_factory.generations,
                                                              self.tokenizer.pad_token_id)
        if self.loss_spec.reward_head:
            scores = model(input_ids=token_ids, attention_mask=attention).logits.squeeze(-1).float()
            return scores, responses.sum(dim=1)
        return sequence_logps(model, token_ids, attention, responses, self.rows_per_forward, self.packed, self.one_row,
                              self.prefix_sharing, self.additive_mask)

    @torch.no_grad()
    def _matches_padded(self, encoded: list[dict], setting: str, what: str, why: str, **layout) -> bool:
        """Whether the forwards of `layout` (options of `sequence_logps`) give the padded forwards' log-probs on the
        first planned micro-batch, for the policy and a separate reference; if not (e.g. OPT's attention ignores
        restarting position ids), padded rows: the same training, only slower. A fallback rather than an error
        because the check runs at the train stage, after generation and annotation, and `setting` is a speed
        setting."""
        batch = self._collate(encoded, self.plan[0][0])
        token_ids, attention, responses = concatenated_inputs(batch, self.batch_factory.generations,
                                                              self.tokenizer.pad_token_id)
        with self.accelerator.autocast():
            for model in (self.model, self.reference):
                if model is None:
                    continue
                model.eval()  # no dropout: the two forwards must see the same model
                padded, counts = sequence_logps(model, token_ids, attention, responses)
                other, _ = sequence_logps(model, token_ids, attention, responses, **layout)
                per_token = ((other - padded).abs() / counts.clamp_min(1)).max().item()
                if not per_token < LAYOUT_TOLERANCE:
                    logger.warning("%s: %s changes %s's log-probs by up to %.3g per token (%s); using padded rows",
                                   setting, what, type(self.accelerator.unwrap_model(model)).__name__, per_token, why)
                    return False
        return True

    @torch.no_grad()
    def _reference_logps(self, batch: dict) -> torch.Tensor:
        if "reference_logps" in batch:  # precomputed in `setup`
            return batch["reference_logps"]
        with self.accelerator.autocast(), self._reference_model() as reference:
            return self.concatenated_forward(reference, batch)[0]

    @torch.no_grad()
    def _kto_kl_estimate(self, batch: dict) -> torch.Tensor:
        """z0 from mismatched pairs under policy and reference, averaged over processes, clamped at 0."""
        token_ids, attention, responses = concatenated_inputs(batch, ("generation1",), self.tokenizer.pad_token_id)
        pairs = mismatched_inputs(token_ids, attention, responses, self.tokenizer.pad_token_id,
                                  self.cfg.training.max_length)
        with self.accelerator.autocast():
            policy = sequence_logps(self.model_unwrapped, *pairs)[0]
            with self._reference_model() as reference_model:
                reference = sequence_logps(reference_model, *pairs)[0]
        return losses.kto_kl_estimate(policy, reference,
                                      across_processes=lambda mean: self.accelerator.reduce(mean, reduction="mean"))

    def _collate(self, examples: list[dict], indices: list[int]) -> dict:
        batch = self.batch_factory.collate([examples[i] for i in indices])
        device = self.accelerator.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ---- checkpoints ----
    def _save(self, uri: str, state: dict, final: bool = True) -> None:
        """Weights + tokenizer + optimizer/scheduler/step state, written by the main process; only the round's
        final save is marked complete, a mid-round one is a resume point."""
        # Every process takes part in gathering a sharded (FSDP) model's and optimizer's full state. A finished
        # round is never resumed (the next round starts its own optimizer): its checkpoint leaves out the
        # optimizer's moments, two thirds of a full checkpoint's bytes in fp32 Adam over bf16 weights.
        weights = self.engine.full_state_dict(self.model)
        optimizer_state = None if final else self.engine.optimizer_state(self.model, self.optimizer)
        if self.accelerator.is_main_process:
            extra = {TRAINER_STATE: json.dumps(state, indent=2).encode()}
            if not final:
                extra[SCHEDULER_STATE] = json.dumps(self.scheduler.state_dict()).encode()
            if optimizer_state is not None:
                extra.update(optimizer_state_files(optimizer_state))
            self.store.save_checkpoint(self.accelerator.unwrap_model(self.model), self.tokenizer, uri,
                                       extra_files=extra, final=final, state_dict=weights)
        self.accelerator.wait_for_everyone()

    def _resumable_state(self, uri: str, fingerprint: str) -> dict | None:
        if self.store.checkpoint_marker(uri) is None:
            return None
        local = Path(self.store.local_checkpoint(uri, resume_point=True))
        if not (local / TRAINER_STATE).exists():
            return None
        state = json.loads((local / TRAINER_STATE).read_text())
        if state.get("fingerprint") != fingerprint:
            logger.warning("checkpoint %s is from another round (fingerprint %s, this one %s); starting over",
                           uri, state.get("fingerprint"), fingerprint)
            return None
        return {**state, "local_dir": str(local)}


# ---- command line (multi-process rounds) -----------------------------------------------------------------
