"""The artifact store: every stage's output as Parquet shards under an fsspec URI (alignment_core/store/
artifact_store.py has the layout and why a run may be killed at any moment). The package: `artifact_store.py`
(`ArtifactStore`: URIs, stages, listing), `shards.py` (shards, manifests, `StageWriter`), `documents.py`
(compare-and-swap documents, for the run lease), `checkpoints.py` (whole-or-nothing checkpoints)."""

from alignment_core.config import check_segment  # noqa: F401  (a store rule, kept importable from here)
from alignment_core.store.artifact_store import ArtifactStore  # noqa: F401
from alignment_core.store.shards import (  # noqa: F401  (the package's names)
    _SHARD,
    CHECKPOINT_MARKER,
    CHECKPOINT_POINTER,
    CHECKPOINT_VERSION_PREFIX,
    MANIFEST,
    RESUME_MARKER,
    STAGE_PLAN,
    DamagedStageError,
    StageWriter,
    _shard_problems,
    fingerprint_digest,
    shard_name,
    shard_record,
)
