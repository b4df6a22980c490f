"""What the distributed engines do differently, behind one small interface the Trainer calls: plain accelerate
(one process, or DDP: every process holds the whole model), FSDP (shards of the parameters and of the optimizer
state) and DeepSpeed ZeRO (its own optimizer step inside `backward`, its own precision, partitioned loading).

    engine = engine_for(accelerator, cfg)
    engine.configure()                       # before the policy loads
    with engine.whole_weights(): ...         # load a frozen model (the reference) unpartitioned
    accelerator.backward(loss, **engine.backward_kwargs)
    engine.full_state_dict(model)            # the weights to save (None: the unwrapped model's own)
    engine.optimizer_state(model, optimizer) # what a resume point saves of the optimizer (None: nothing)
"""

from contextlib import contextmanager

from accelerate import Accelerator
from accelerate.utils import DistributedType

from alignment_core.config import PipelineConfig


class Engine:
    """Plain accelerate: whole weights and a plain optimizer state on every process."""

    backward_kwargs: dict = {}

    def __init__(self, accelerator: Accelerator, cfg: PipelineConfig):
        self.accelerator, self.cfg = accelerator, cfg

    def configure(self) -> None:
        """Settings the engine needs before the policy loads."""

    @contextmanager
    def whole_weights(self):
        """Models loaded inside are whole on each process."""
        yield

    def full_state_dict(self, model) -> dict | None:
        """The whole weights to save, gathered by every process; None: the unwrapped model's own state."""
        return None

    def optimizer_state(self, model, optimizer) -> dict | None:
        """The optimizer's state a resume point saves (None: none, a resume starts the moments afresh)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


class FSDPEngine(Engine):
    """FSDP holds shards of the parameters (DTensors, also on one GPU): saves gather them, and the optimizer's
    full state is keyed by parameter name."""

    def full_state_dict(self, model) -> dict | None:
        return self.accelerator.get_state_dict(model)

    def optimizer_state(self, model, optimizer) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True))


class DeepSpeedEngine(Engine):
    """DeepSpeed (ZeRO): it steps its optimizer inside `backward`, partitions ZeRO-3 weights as they load, and
    its partitioned optimizer state has no form to save short of its own (pickled) checkpoints."""

    # The Trainer's loss scale already makes the sum over the global batch: DeepSpeed must not divide by the
    # accumulation steps.
    backward_kwargs = {"scale_wrt_gas": False}

    def configure(self) -> None:
        """The round's micro-batch size, accumulation steps and clipping come from `training` (not from the
        accelerate config file), and a ZeRO-3 save gathers the whole weights. bf16 weights (model.dtype) without
        `training.mixed_precision` train in DeepSpeed's bf16 mode, fp32 master weights and moments as under FSDP:
        set before the policy loads, since ZeRO-3 partitions it as it loads, in the precision its config names
        (else fp32, twice the memory)."""
        tc, plugin = self.cfg.training, self.accelerator.state.deepspeed_plugin
        ds = plugin.deepspeed_config
        ds.update(train_micro_batch_size_per_gpu=tc.batch_size,
                  gradient_accumulation_steps=tc.gradient_accumulation_steps, gradient_clipping=tc.max_grad_norm)
        ds.pop("train_batch_size", None)  # accelerate derives it from the three above
        ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
        if tc.mixed_precision == "no" and self.cfg.model.dtype == "bfloat16":
            ds["bf16"] = {"enabled": True}
        plugin.set_deepspeed_weakref()  # what transformers reads when it loads under ZeRO-3

    @contextmanager
    def whole_weights(self):
        """Under ZeRO-3 transformers partitions weights as they load (it reads the DeepSpeed config accelerate
        registers), and only a DeepSpeed engine runs a partitioned model: the frozen reference is a whole copy on
        each process instead."""
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            self.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()

    def full_state_dict(self, model) -> dict | None:
        return self.accelerator.get_state_dict(model)

    def optimizer_state(self, model, optimizer) -> dict | None:
        return None

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        raise ValueError("a DeepSpeed round saves no optimizer state to load")


ENGINES = {DistributedType.FSDP: FSDPEngine, DistributedType.DEEPSPEED: DeepSpeedEngine}


def engine_for(accelerator: Accelerator, cfg: PipelineConfig) -> Engine:
    """The engine of the accelerator's distributed type (plain accelerate for every other)."""
    return ENGINES.get(accelerator.distributed_type, Engine)(accelerator, cfg)
