"""The one way a stage runs (`run_stage`), for every row of the stage table (alignment_core/stages.py): its
fingerprint, then skip it (complete for this fingerprint), keep it (a finished iteration, only the library code
changed), refuse (a finished iteration, anything else changed) or compute it."""

import logging
from collections.abc import Callable
from typing import Any

from alignment_core import kept_models
from alignment_core.config import PipelineConfig
from alignment_core.digests import stage_code_digest
from alignment_core.stages import StageSpec
from alignment_core.store import ArtifactStore, fingerprint_digest

log = logging.getLogger(__name__)

class FinishedIterationChangedError(ValueError):
    """Redoing a stage of a finished iteration (complete checkpoint) computed from something else."""


Compute = Callable[[str, dict], None]  # (the stage's URI, its fingerprint): computes and writes the stage


def run_stage(cfg: PipelineConfig, store: ArtifactStore, spec: StageSpec, iteration: int, inputs: dict,
              compute: Compute, *, out: str | None = None, config: Any = None) -> str:
    """The one way a stage runs: its fingerprint (`spec.sections` of the config, or `config`; the digests in
    `inputs`; the code digest of `spec.code`), then skip it when the store holds it complete for that
    fingerprint, keep it when its iteration is finished and only the library code changed (`keep_finished`),
    or compute it (`compute(out, fingerprint)` writes it, verified, through the store). Returns its URI."""
    out = out or store.stage_uri(cfg.store.run_name, iteration, spec.path)
    # Not under an async schedule, whose in-process stages run beside each other.
    kept_models.configure(cfg.scale_out.keep_models_loaded and cfg.scale_out.schedule == "sync")
    fingerprint = {"stage": spec.path, "config": cfg.stage_hash(*spec.sections) if config is None else config,
                   "inputs": inputs, "code": stage_code_digest(spec.name)}
    record = _record(store, spec, out)
    previous = record["fingerprint"] if record else None
    same = previous is not None and fingerprint_digest(previous) == fingerprint_digest(fingerprint)
    if same and _complete(store, spec, out, record, fingerprint):
        if not (spec.retries_transient and _retry_transient(cfg, store, out, record, iteration)):
            rows = f" ({record['rows']} rows)" if spec.record == "manifest" else ""
            log.info("%s: already complete%s, skipped", out, rows)
            return out
    elif spec.keeps_finished and keep_finished(cfg, store, out, iteration, fingerprint, previous):
        return out
    try:
        compute(out, fingerprint)
    finally:
        # Models kept for later stages wait in host memory: the next stage may need the device's (a vLLM engine
        # sizes itself by the free memory), or another process on the same GPU (a dispatched stage).
        kept_models.park()
    return out


def _record(store: ArtifactStore, spec: StageSpec, out: str) -> dict | None:
    """The document that records a finished copy of the stage and its `fingerprint`: its manifest, or a
    checkpoint's lineage.json (written once the checkpoint is complete). None: no finished copy."""
    if spec.record == "lineage":
        lineage = f"{out}/lineage.json"
        complete = store.checkpoint_complete(out) and store.exists(lineage)
        return store.read_json(lineage) if complete else None
    return store.read_manifest(out)


def _complete(store: ArtifactStore, spec: StageSpec, out: str, record: dict, fingerprint: dict) -> bool:
    """Every shard of the stage (and of its siblings, `spec.also`) there, of the recorded size, rows and sha256."""
    if spec.record == "lineage":
        return True  # the lineage is written after the checkpoint's files, which `checkpoint_complete` checked
    siblings = [f"{out.rsplit('/', 1)[0]}/{name}" for name in spec.also]
    return store.is_complete(out, fingerprint, record) and all(store.is_complete(uri, fingerprint) for uri in siblings)


def _retry_transient(cfg: PipelineConfig, store: ArtifactStore, out: str, manifest: dict, iteration: int) -> bool:
    """Whether a complete stage is computed again in its rows that failed for a transient reason (judge outage,
    timeout): not once its iteration is finished."""
    transient = manifest["extra"].get("transient_failures", 0)
    if not transient:
        return False
    if store.checkpoint_complete(store.checkpoint_uri(cfg.store.run_name, iteration)):
        log.warning("%s: %d annotations failed for a transient reason; its iteration is finished, so they are "
                    "not retried", out, transient)
        return False
    log.info("%s: retrying the %d annotations that failed for a transient reason", out, transient)
    return True


def _differences(old: dict, new: dict) -> str:
    """Which parts of two fingerprints differ, in words: config, which inputs, library code."""
    parts = []
    if old.get("config") != new.get("config"):
        parts.append("the config")
    old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
    changed = sorted(k for k in set(old_inputs) | set(new_inputs) if old_inputs.get(k) != new_inputs.get(k))
    if changed:
        parts.append("its inputs (" + ", ".join(changed) + ")")
    if old.get("code") != new.get("code"):
        parts.append("the library code")
    others = sorted(k for k in set(old) | set(new)
                    if k not in ("config", "inputs", "code") and old.get(k) != new.get(k))
    return ", ".join(parts + others) or "the fingerprint"


def keep_finished(cfg: PipelineConfig, store: ArtifactStore, stage_uri: str, iteration: int,
                  fingerprint: dict, previous: dict | None) -> bool:
    """Whether a stage of a finished iteration stays as it is although its fingerprint changed.

    A finished iteration is history: when only the library code changed since (an upgrade), its stages are kept
    and later iterations run on the new code. When anything else changed (the config, the data, a model),
    redoing the stage would silently replace the iteration's checkpoint: that raises, unless
    `store.force_rerun` asks for it. `previous` is the fingerprint the stage's copy in the store was computed
    from (None: there is none). Iteration 0's stages (the offline examples) count as finished with iteration 1.
    """
    if cfg.store.force_rerun:
        return False
    if previous is None or fingerprint_digest(previous) == fingerprint_digest(fingerprint):
        return False
    checkpoint = store.checkpoint_uri(cfg.store.run_name, max(iteration, 1))
    if not store.checkpoint_complete(checkpoint):
        return False
    if {**previous, "code": None} == {**fingerprint, "code": None}:
        log.info("%s: computed by an earlier version of the library; kept, since iteration %d is finished "
                 "(--force redoes it)", stage_uri, max(iteration, 1))
        return True
    raise FinishedIterationChangedError(
        f"iteration {max(iteration, 1)} of run {cfg.store.run_name!r} is finished ({checkpoint}), but its stage "
        f"{stage_uri.rsplit('/', 1)[-1]!r} would now be computed from something else: "
        f"{_differences(previous, fingerprint)} changed. Redoing it would replace the finished iteration. "
        "Give this config its own run (--run-name NAME, or store.run_name), or redo the run on purpose with "
        "--force (flow parameter force=true, or store.force_rerun: true)")
