"""LoRA adapters (peft): trained instead of the full weights when the config has a `model.adapter` section.

What an adapter checkpoint is: peft's `adapter_config.json` + `adapter_model.safetensors` (plus the tokenizer
and the optimizer state of the adapter's parameters), a small fraction of a full checkpoint. Its
`base_model_name_or_path` is the base model's *config name* (a hub id, `tiny://llama`, a store URI or a path
as the user wrote it), never a machine-local snapshot folder, so any worker resolves it with
`models.resolve_model_path`; the checkpoint's lineage records the base's digest too.

    model = models.load_causal_lm(path)                          # an adapter folder: base + adapter, merged
    model = models.load_causal_lm(path, adapter_mode="trainable")  # base + adapter, the adapter trainable
    peft_model = add_adapter(base_model, cfg.model.adapter, "causal_lm", base_name="tiny://llama")
    with adapter_disabled(peft_model): ...                        # the base model: the DPO/KTO/RL reference

Full weights at the end: `alignment-core merge CHECKPOINT OUT` (alignment_core/merge.py) writes a normal
`save_pretrained` folder (base + adapter merged) that loads without peft.
"""

import json
import logging
from contextlib import contextmanager
from pathlib import Path

from alignment_core.inputs import InputRef, is_store_uri

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# vLLM compiles its LoRA kernels for these maximum ranks; an adapter of rank r needs the smallest >= r.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def is_adapter(path) -> bool:
    """A local folder holding a peft adapter (adapter_config.json)."""
    return path is not None and Path(str(path)).expanduser().joinpath(ADAPTER_CONFIG).is_file()


def adapter_config(path) -> dict:
    return json.loads(Path(str(path)).expanduser().joinpath(ADAPTER_CONFIG).read_text())


def adapter_base(path) -> str:
    """The config name of the adapter's base model (as written by `add_adapter`, or by peft elsewhere)."""
    base = adapter_config(path).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"adapter {path} does not name its base model (base_model_name_or_path)")
    return base


def lora_config(adapter_cfg, task: str):
    """peft's LoraConfig from the config's `model.adapter` section, for a causal LM or a reward model.

    A reward model's score head is new (or task specific), so it trains in full beside the adapter and is
    saved with it (peft's `modules_to_save` for sequence classification).
    """
    from peft import LoraConfig, TaskType

    target = adapter_cfg.target_modules
    return LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "reward_model" else TaskType.CAUSAL_LM,
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.alpha,
        lora_dropout=adapter_cfg.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        bias=adapter_cfg.bias,
    )


def quantization_config(adapter_cfg, dtype: str):
    """transformers' BitsAndBytesConfig for QLoRA (the frozen base in 4 bits, computing in `dtype`), or None
    without `load_in_4bit`."""
    if adapter_cfg is None or not adapter_cfg.load_in_4bit:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=adapter_cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=adapter_cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, dtype),
    )


def linear_module_names(model_path: str, task: str, trust_remote_code: bool = False) -> list[str]:
    """The dotted names of the model's linear layers (GPT-2's Conv1D too), output head left out, read from a
    copy built on the meta device from its config: no weights are read or allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    auto_class = AutoModelForSequenceClassification if task == "reward_model" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto_class.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings() if task != "reward_model" else getattr(model, "score", None)
    return [name for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head]


def target_module_problems(cfg, store) -> list[str]:
    """A LoRA `target_modules` list checked against the policy's own module names, before any model work.

    A list that matches no linear layer is a problem (peft would fail only at the train stage, after generation
    and annotation). A list with names the model does not have, while some of its linear layers stay
    unadapted, is logged as a warning naming them: a list written for another family (Llama's q_proj/k_proj/
    v_proj and gate_proj/up_proj on Phi-3, whose fused qkv_proj and gate_up_proj it then leaves out). Matching
    is peft's rule for a list: a module's full name, or its name ending in "." + the listed name.
    """
    adapter_cfg = cfg.model.adapter
    if adapter_cfg is None or adapter_cfg.target_modules == "all-linear" or is_store_uri(cfg.model.policy):
        return []  # all-linear always matches; a checkpoint in a store is the stage's to copy
    try:
        path = InputRef.model(cfg.model.policy).resolve(store=store, cache_dir=str(store.cache_dir))
    except (OSError, ValueError):
        return []  # preflight reports the policy itself
    if is_adapter(path):
        return []  # an adapter checkpoint trains its own, saved targets
    # Here, not above: losses imports torch, and preflight's quick checks (run before the Prefect server starts,
    # which then boots while the rest of the preflight imports torch) call this for every config.
    from alignment_core.losses import LOSSES

    task = "reward_model" if LOSSES[cfg.training.loss].reward_head else "causal_lm"
    linear = linear_module_names(path, task, trust_remote_code=cfg.model.trust_remote_code)
    kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in linear))

    def matches(target: str, name: str) -> bool:
        return name == target or name.endswith("." + target)

    targets = list(adapter_cfg.target_modules)
    unmatched = [t for t in targets if not any(matches(t, name) for name in linear)]
    adapted = [name for name in linear if any(matches(t, name) for t in targets)]
    left_out = [kind for kind in kinds if not any(name.rsplit(".", 1)[-1] == kind for name in adapted)]
    if len(unmatched) == len(targets):
        return [f"model.adapter.target_modules: {targets} match no linear layer of {cfg.model.policy} "
                f"(its linear layers: {kinds}); list some of those, or use \"all-linear\""]
    if unmatched and left_out:
        logger.warning("model.adapter.target_modules: %s match nothing in %s, and its %s layers are left out "
                       "(not adapted); its linear layers: %s", unmatched, cfg.model.policy, left_out, kinds)
    return []


def set_base_name(model, base_name: str) -> None:
    """Record the base by its config name in every adapter config the model saves."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = str(base_name)


def add_adapter(model, adapter_cfg, task: str, base_name: str):
    """A new, trainable LoRA adapter on `model` (B = 0: the model computes what the base computes)."""
    from peft import get_peft_model

    # A 4-bit base is used as loaded, without peft's prepare_model_for_kbit_training: its fp32 copy of the norms,
    # embeddings and head turned every activation after them fp32 (twice a bf16 model's; the likely cause of
    # QLoRA's GPU peak above full bf16 fine-tuning's). get_peft_model freezes the base; checkpointing is
    # non-reentrant, so no input needs to require grad.
    peft_model = get_peft_model(model, lora_config(adapter_cfg, task))
    set_base_name(peft_model, base_name)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA adapter (r=%d) on %s: %d trainable parameters of %d (%.2f%%)", adapter_cfg.r, base_name,
                trainable, total, 100 * trainable / max(total, 1))
    return peft_model


def keep_4bit_layers_differentiable(model) -> None:
    """Turn off bitsandbytes' CPU inference repacking in `model`'s 4-bit layers, for a model that trains. On a
    CPU with AVX512-BF16, a 4-bit layer's first forward in eval mode on an input without gradient (a reference
    pass, a layout check) repacks its weights for a kernel that has no backward, and keeps them so: later
    backward passes get no gradient through the layer, and the adapters before it train on wrong gradients,
    silently (torch only warns)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_adapter(base_model, path, trainable: bool = False):
    """The adapter at `path` on `base_model` (already loaded), trainable or frozen."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(Path(str(path)).expanduser()), is_trainable=trainable)
    set_base_name(model, adapter_base(path))  # keep the config name even if peft rewrote it
    return model


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


@contextmanager
def adapter_disabled(model):
    """The base model: `model` (a PeftModel, possibly wrapped by DDP) with its adapter off and in eval mode.

    No second copy of the weights: the same modules skip their LoRA branch (and modules_to_save use their
    original copy). Eval mode for the block, as a separately loaded reference would be; the previous
    training mode is restored after.
    """
    peft_model = getattr(model, "module", model)
    if not is_peft_model(peft_model):
        raise TypeError(f"adapter_disabled needs a peft model, got {type(peft_model).__name__}")
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            yield peft_model
    finally:
        peft_model.train(was_training)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of rank `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")
