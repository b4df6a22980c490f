"""The artifact store: every stage's output as Parquet shards under an fsspec URI (alignment_core/store/
artifact_store.py has the layout and why a run may be killed at any moment). The package: `artifact_store.py`
(`ArtifactStore`: URIs, stages, listing), `shards.py` (shards, manifests, `StageWriter`), `documents.py`
(compare-and-swap documents, for the run lease), `checkpoints.py` (whole-or-nothing checkpoints)."""

from alignment_core.config import check_segment  # noqa: F401  (a store rule, kept importable from here)
from alignment_core.store.artifact_store import *  # noqa: F403  (its __all__)
from alignment_core.store.shards import *  # noqa: F403  (its __all__)
