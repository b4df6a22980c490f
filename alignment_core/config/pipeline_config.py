"""`PipelineConfig`: one run's whole configuration, a section per stage, with the rules across sections."""

import hashlib
import json

from pydantic import Field, model_validator

from alignment_core.config.common import Setup, StrictModel, check_fits_model_len, samples_needed
from alignment_core.config.feedback import AnnotationConfig, ReweightConfig
from alignment_core.config.operations import ScaleOutConfig, TrackingConfig
from alignment_core.config.optimization import EvaluationConfig, TrainingConfig
from alignment_core.config.sources import DataConfig, GenerationConfig, ModelConfig, StoreConfig
from alignment_core.setups import SETUPS

__all__ = [  # what the package re-exports
    "PipelineConfig",
]


def _check_4bit_possible() -> None:
    """QLoRA's 4-bit base needs bitsandbytes, and where there is no CUDA device one that quantizes on the CPU
    (0.50 does; older ones were CUDA only): say so at config load, not mid-run."""
    try:
        import bitsandbytes
        from bitsandbytes.functional import quantize_4bit
    except ImportError as error:
        raise ValueError("model.adapter.load_in_4bit (QLoRA) needs the bitsandbytes package: "
                         "pip install 'alignment-core[qlora]'") from error
    import torch

    if torch.cuda.is_available():
        return
    try:
        quantize_4bit(torch.ones(64), quant_type="nf4")
    except Exception as error:  # whatever an old bitsandbytes raises without CUDA
        raise ValueError(f"model.adapter.load_in_4bit (QLoRA): this machine has no CUDA device and bitsandbytes "
                         f"{bitsandbytes.__version__} cannot quantize on its CPU ({type(error).__name__}: {error}); "
                         "upgrade bitsandbytes, use LoRA without load_in_4bit here, or send training to a GPU "
                         "machine (scale_out.train_deployment)") from error


class PipelineConfig(StrictModel):
    setup: Setup = "online_pairwise"
    """The learning setup: online (rl, online_pointwise, online_pairwise) or offline (the other four)."""
    iterations: int = Field(default=2, gt=0, le=10_000)
    """Online iterations of the run (the flow's `iterations` parameter overrides it when set)."""
    data: DataConfig = DataConfig()
    """Where prompts or examples come from, and which are held out."""
    model: ModelConfig = ModelConfig()
    """The policy, reference, tokenizer, adapter and loading knobs."""
    generation: GenerationConfig = GenerationConfig()
    """Sampling from the policy (online setups)."""
    annotation: AnnotationConfig = AnnotationConfig()
    """Labelling the samples: reward model, LLM judge or rule (online setups, and evaluation)."""
    reweight: ReweightConfig = ReweightConfig()
    """Per-unit training weights."""
    training: TrainingConfig = TrainingConfig()
    """One training round per iteration."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """Held-out win-rates and rewards after each round."""
    store: StoreConfig = StoreConfig()
    """Where stages and checkpoints are written (the flow's `run_name` and `store_root` override it when set)."""
    scale_out: ScaleOutConfig = ScaleOutConfig()
    """Stages run as their own deployed flows (e.g. on a GPU pool)."""
    tracking: TrackingConfig = TrackingConfig()
    """Experiment trackers (TensorBoard, MLflow, W&B, trackio)."""

    @model_validator(mode="after")
    def _consistent(self) -> "PipelineConfig":
        """Combinations that would only fail after expensive work (sampling, loading models) fail here."""
        spec = SETUPS[self.setup]
        if self.training.loss not in spec.losses:
            raise ValueError(f"training.loss {self.training.loss!r} does not fit setup {self.setup!r}; "
                             f"use one of {spec.losses}")
        annotation = self.annotation
        needed, why = samples_needed(self)
        if self.online and self.generation.n_samples < needed:
            raise ValueError(f"generation.n_samples must be >= {needed} for setup {self.setup!r} "
                             f"({why}), got {self.generation.n_samples}")
        pairs_only = ("judge_pairwise", "cascade", "human")
        if self.online and spec.annotation != "pairs" and annotation.annotator in pairs_only:
            raise ValueError(f"annotation.annotator {annotation.annotator!r} gives preference pairs, but setup "
                             f"{self.setup!r} needs {spec.annotation}: use "
                             "'judge_pointwise', 'reward_model' or 'programmatic'")
        if self.online and annotation.annotator == "human" and self.evaluation.enabled:
            raise ValueError("annotation.annotator 'human' labels the training pairs only; held-out evaluation needs "
                             "an automatic judge: set evaluation.enabled: false, or use a cascade with "
                             "escalate_to: human (evaluation is then judged by its first annotator)")
        if self.scale_out.schedule == "async":
            if not self.online:
                raise ValueError(f"scale_out.schedule 'async' overlaps the sampling of online iterations with "
                                 f"training; setup {self.setup!r} samples nothing: use schedule 'sync'")
            if "human" in annotation.kinds:
                raise ValueError("scale_out.schedule 'async' labels the next iterations while one trains, but a "
                                 "'human' annotator pauses the flow run for its answers: use schedule 'sync'")
        if self.evaluation.enabled:
            check_fits_model_len("evaluation.max_new_tokens", self.evaluation.max_new_tokens,
                                 self.generation.max_model_len)
        if not self.online and self.data.format != "auto" and self.data.format not in spec.data_formats:
            raise ValueError(f"data.format {self.data.format!r} gives no examples setup {self.setup!r} can train "
                             f"on; use one of {spec.data_formats} (or auto)")
        if self.online and "reward_model" in annotation.kinds and not annotation.reward_model:
            raise ValueError("annotation.reward_model must name a reward model when annotation.annotator is "
                             "'reward_model' (or a cascade uses one)")
        if annotation.cascade.refresh.enabled and annotation.annotator != "cascade":
            raise ValueError("annotation.cascade.refresh learns from a cascade's escalated labels: set "
                             "annotation.annotator to 'cascade'")
        ensemble_options = annotation.ensemble_penalty or annotation.max_disagreement is not None
        if ensemble_options and len(annotation.reward_models) < 2:
            raise ValueError("annotation.ensemble_penalty and annotation.max_disagreement need an ensemble: "
                             "annotation.reward_model as a list of two or more reward models")
        if self.online and annotation.judge_kind:
            judge = annotation.judge
            if judge.backend in ("local", "vllm") and not judge.model:
                raise ValueError("annotation.judge.model must name the judge model for a local judge")
            if judge.backend == "http" and not (judge.base_url and judge.model):
                raise ValueError("annotation.judge.base_url and annotation.judge.model are needed for an http judge")
        if self.reweight.strategy == "importance" and not self.reweight.behaviour_model:
            raise ValueError("reweight.behaviour_model must name the model that wrote the responses when "
                             "reweight.strategy is 'importance'")
        if self.reweight.uses_sampler and not self.online:
            raise ValueError("reweight.behaviour_model 'sampler' reads the log-probs recorded when the policy sampled; "
                             f"setup {self.setup!r} samples nothing: name the model that wrote the data")
        remote_store = "://" in self.store.root and not self.store.root.startswith("file://")
        if "tensorboard" in self.tracking.report_to and remote_store and not self.tracking.logging_dir:
            raise ValueError("tracking.logging_dir must name a local folder for tensorboard when store.root is "
                             f"remote ({self.store.root})")
        adapter = self.model.adapter
        if adapter is not None and adapter.load_in_4bit and not self.scale_out.train_deployment:
            # Training runs here (a train deployment runs it elsewhere, and validates the config there).
            _check_4bit_possible()
        return self

    @property
    def online(self) -> bool:
        return SETUPS[self.setup].online

    def with_reward_models(self, members: list[str]) -> "PipelineConfig":
        """This config with `members` (refreshed reward models, alignment_core/refresh.py) in place of
        `annotation.reward_model`; one model stays one model."""
        models = members[0] if isinstance(self.annotation.reward_model, str) else list(members)
        return self.model_copy(update={"annotation": self.annotation.model_copy(update={"reward_model": models})})

    def stage_hash(self, *sections: str) -> str:
        """A short digest of the named config sections: the part of the config a stage depends on."""
        payload = {name: getattr(self, name).model_dump(mode="json") for name in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
