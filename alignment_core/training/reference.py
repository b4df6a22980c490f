"""The reference log-probs of a round's examples, precomputed once before training: the sampler's own where they
are exact (the reference sampled the responses, and training sees them untruncated:
`training.reference_from_sampler`), a reference forward for the rest, each process computing a share."""

import logging

import numpy as np
import torch
from accelerate.utils import gather_object

from alignment_core.models import model_digest, resolve_model_path
from alignment_core.progress import bar as progress_bar

logger = logging.getLogger(__name__)


class ReferenceLogps:
    """The Trainer's precomputed reference log-probs (a mixin: it reads the Trainer's config, store, batch
    factory, accelerator and `_reference_logps`)."""

    def _with_sampler_reference_logps(self, encoded: list[dict]) -> list[dict]:
        """The examples with the sampler's log-probs as their `reference_logps` where those are the reference's
        (`training.reference_from_sampler`): every generation of the example sampled by the reference model
        (same digest) and trained on untruncated (`BatchFactory.sampler_logp`). Without precomputation a batch
        takes its reference log-probs from one source, so then every example must qualify or none is used."""
        self.reference_rows_from_sampler = 0
        if not self.cfg.training.reference_from_sampler:
            return encoded
        digest = model_digest(resolve_model_path(self.reference_path, store=self.store))
        sides = self.batch_factory.generations
        samplers = [[example.get(f"{side}_sampler") for side in sides] for example in encoded]
        usable = [all(s is not None and s[1] == digest for s in sampled) for sampled in samplers]
        if not self.cfg.training.precompute_reference and not all(usable):
            return encoded
        self.reference_rows_from_sampler = sum(usable)
        logger.info("reference log-probs of %d of %d examples from the sampler (reference %s)",
                    self.reference_rows_from_sampler, len(encoded), self.reference_path)
        return [{**example, "reference_logps": [s[0] for s in sampled]} if ok else example
                for example, sampled, ok in zip(encoded, samplers, usable, strict=True)]

    @torch.no_grad()
    def _with_reference_logps(self, encoded: list[dict]) -> list[dict]:
        """The examples with their reference log-probs (one per generation) as a `reference_logps` column, as
        TRL's precompute_ref_log_probs does; each process computes a share. Examples that already have them
        (from the sampler) keep them."""
        missing = [i for i, example in enumerate(encoded) if "reference_logps" not in example]
        share = np.array_split(np.array(missing, dtype=np.int64), self.accelerator.num_processes)[
            self.accelerator.process_index
        ]
        size = self.cfg.training.batch_size
        rows = []
        for start in progress_bar(range(0, len(share), size), desc="reference log-probs", leave=False,
                                  disable=not self.accelerator.is_main_process):
            indices = share[start : start + size].tolist()
            logps = self._reference_logps(self._collate(encoded, indices)).cpu()
            columns = logps.view(len(self.batch_factory.generations), len(indices))
            rows += [(i, columns[:, j].tolist()) for j, i in enumerate(indices)]
        by_index = dict(gather_object(rows))
        return [{**example, "reference_logps": by_index[i]} if i in by_index else example
                for i, example in enumerate(encoded)]
