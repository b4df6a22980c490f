"""Typed configuration: one `PipelineConfig` composed of one model per stage.

This is the single source of truth for every knob. Defaults run the built-in tiny setup on a CPU.
Configs load from YAML (`load_config`); a wrong field, type or value fails at load time with a message
that names the field, e.g. `training.beta must be > 0, got -1`.

The package, by what the sections configure: `common.py` (names, bounds and checks every section shares),
`sources.py` (store, data, models, sampling), `feedback.py` (annotation, reweighting), `optimization.py`
(training, evaluation), `operations.py` (scale-out, trackers), `pipeline_config.py` (`PipelineConfig` and its
rules across sections), `loading.py` (YAML and dicts in and out, error wording).
"""

from alignment_core.config.common import *  # noqa: F403  (its __all__)
from alignment_core.config.feedback import *  # noqa: F403  (its __all__)
from alignment_core.config.loading import *  # noqa: F403  (its __all__)
from alignment_core.config.operations import *  # noqa: F403  (its __all__)
from alignment_core.config.optimization import *  # noqa: F403  (its __all__)
from alignment_core.config.pipeline_config import *  # noqa: F403  (its __all__)
from alignment_core.config.sources import *  # noqa: F403  (its __all__)
