"""The models of a training round, as the Trainer loads them: the policy (full weights, or a LoRA adapter, new or
continued; QLoRA's 4-bit base), and the reference (a frozen copy, or the policy with its adapter switched off
when the reference is the adapter's base: no second copy of the weights)."""

import logging
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from alignment_core import kept_models
from alignment_core.adapters import (
    adapter_base,
    adapter_config,
    adapter_disabled,
    add_adapter,
    is_adapter,
    is_peft_model,
    keep_4bit_layers_differentiable,
    quantization_config,
)
from alignment_core.models import load_causal_lm, load_reward_model, model_digest, resolve_model_path

logger = logging.getLogger(__name__)


class RoundModels:
    """The Trainer's model loading (a mixin: it reads the Trainer's config, store, tokenizer, loss row,
    accelerator and engine)."""

    def _load_kwargs(self) -> dict:
        model_cfg, adapter_cfg = self.cfg.model, self.cfg.model.adapter
        kwargs = {"dtype": model_cfg.dtype, "trust_remote_code": model_cfg.trust_remote_code, "store": self.store,
                  "attn_implementation": model_cfg.attn_implementation}
        quantization = quantization_config(adapter_cfg, model_cfg.dtype)
        if quantization is not None:  # QLoRA: the frozen base in 4 bits
            kwargs["quantization_config"] = quantization
            kwargs["device_map"] = {"": self.accelerator.device}
        return kwargs

    def _load_policy(self, path: str):
        """The model to train: full weights, or (model.adapter) a LoRA adapter, new or continued."""
        adapter_cfg = self.cfg.model.adapter
        task = "reward_model" if self.loss_spec.reward_head else "causal_lm"
        load = partial(load_reward_model, tokenizer=self.tokenizer) if task == "reward_model" else load_causal_lm
        kwargs = self._load_kwargs()
        local = resolve_model_path(path, store=self.store)
        self._base_path = local  # the weights under the adapter (for the reference)
        if is_adapter(local):
            self._base_path = resolve_model_path(adapter_base(local), store=self.store)
            if adapter_cfg is None:
                logger.info("policy %s is an adapter and model.adapter is not set: training base + adapter, "
                            "merged, in full", path)
                model = load(path, adapter_mode="merge", **kwargs)
            else:
                stored = adapter_config(local)
                logger.info("continuing the adapter %s (r=%s, base %s)", path, stored.get("r"), adapter_base(local))
                if stored.get("r") != adapter_cfg.r:
                    logger.warning("the adapter %s has rank %s, model.adapter.r is %d: continuing the stored one",
                                   path, stored.get("r"), adapter_cfg.r)
                model = load(path, adapter_mode="trainable", **kwargs)
        else:
            # (a reward model to train is loaded: no stage keeps one loaded with these options)
            options = self._kept_options(kwargs) if task == "causal_lm" else None
            model = (load(path, **kwargs) if options is None
                     else kept_models.taken(task, local, partial(load, path, **kwargs), **options))
            if adapter_cfg is not None:
                model = add_adapter(model, adapter_cfg, task, base_name=self.policy_name)
        if "quantization_config" in kwargs:
            keep_4bit_layers_differentiable(model)
        model.config.use_cache = False
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    @property
    def gradient_checkpointing(self) -> bool:
        """training.gradient_checkpointing, its default resolved: on when an adapter trains."""
        chosen = self.cfg.training.gradient_checkpointing
        return self.cfg.model.adapter is not None if chosen is None else chosen

    def _kept_options(self, kwargs: dict) -> dict | None:
        """What a causal LM kept loaded between stages (alignment_core/kept_models.py) is known by besides its
        weights; None where this round loads its own: a 4-bit base (placed on the device as it loads)."""
        if "quantization_config" in kwargs:
            return None
        return {"dtype": kwargs["dtype"], "attn_implementation": kwargs["attn_implementation"],
                "trust_remote_code": kwargs["trust_remote_code"]}

    def _reference_matches_base(self) -> bool:
        """Whether the configured reference is the policy adapter's base model (same folder or same weights)."""
        reference = Path(resolve_model_path(self.reference_path, store=self.store)).resolve()
        base = Path(self._base_path).resolve()
        if reference == base:
            return True
        if is_adapter(reference):
            return False
        try:
            return model_digest(reference) == model_digest(base)
        except FileNotFoundError:
            return False

    def _load_reference(self):
        self.reference_is_base = False
        if not self.loss_spec.reference:
            return None
        if is_peft_model(self.model_unwrapped):
            if self._reference_matches_base():
                logger.info("reference %s is the adapter's base model: computing it with the adapter switched "
                            "off (no second copy of the weights)", self.reference_path)
                self.reference_is_base = True
                return None
            logger.info("reference %s is not the adapter's base model: loading it separately", self.reference_path)
        kwargs = self._load_kwargs()
        load = partial(load_causal_lm, self.reference_path, **kwargs)
        # Kept for the next rounds (the reference is the same model every round unless it is the round's policy)
        options = self._kept_options(kwargs)
        with self.engine.whole_weights():
            reference = load() if options is None else kept_models.shared(
                "causal_lm", resolve_model_path(self.reference_path, store=self.store), load, **options)
        reference.requires_grad_(False).eval()
        return reference if "device_map" in kwargs else reference.to(self.accelerator.device)

    @property
    def model_unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    @contextmanager
    def _reference_model(self):
        """The reference for a forward under no_grad: its own model, or the policy with the adapter off."""
        if self.reference_is_base:
            with adapter_disabled(self.model_unwrapped) as base:
                yield base
        else:
            yield self.reference
