"""Typed configuration: one `PipelineConfig` composed of one model per stage.

This is the single source of truth for every knob. Defaults run the built-in tiny setup on a CPU.
Configs load from YAML (`load_config`); a wrong field, type or value fails at load time with a message
that names the field, e.g. `training.beta must be > 0, got -1`.

The package, by what the sections configure: `common.py` (names, bounds and checks every section shares),
`sources.py` (store, data, models, sampling), `feedback.py` (annotation, reweighting), `optimization.py`
(training, evaluation), `operations.py` (scale-out, trackers), `pipeline_config.py` (`PipelineConfig` and its
rules across sections), `loading.py` (YAML and dicts in and out, error wording).
"""

from alignment_core.config.common import (  # noqa: F401  (the package's names)
    BUNDLED_PREFIX,
    DATA_COLUMNS,
    DATA_FILE_SUFFIXES,
    DATA_FORMATS,
    DEFAULT_CACHE_DIR,
    MAX_BATCH,
    MAX_COUNT,
    MAX_TOKENS,
    RUN_NAME,
    TINY_MODEL,
    Loss,
    Setup,
    StrictModel,
    check_fits_model_len,
    check_prompt_fits,
    check_reweight_clip,
    check_segment,
    check_single_file_options,
    is_single_file_source,
    samples_needed,
)
from alignment_core.config.feedback import (  # noqa: F401  (the package's names)
    AnnotationConfig,
    CascadeConfig,
    HumanConfig,
    JudgeConfig,
    RefreshConfig,
    ReweightConfig,
)
from alignment_core.config.loading import (  # noqa: F401  (the package's names)
    ConfigError,
    UniqueKeyLoader,
    dump_config,
    load_config,
    parse_config,
    yaml_load_unique,
)
from alignment_core.config.operations import (  # noqa: F401  (the package's names)
    TRACKERS,
    ScaleOutConfig,
    TrackingConfig,
)
from alignment_core.config.optimization import (  # noqa: F401  (the package's names)
    EvaluationConfig,
    TrainingConfig,
)
from alignment_core.config.pipeline_config import (  # noqa: F401  (the package's names)
    PipelineConfig,
)
from alignment_core.config.sources import (  # noqa: F401  (the package's names)
    AdapterConfig,
    DataConfig,
    GenerationConfig,
    ModelConfig,
    StoreConfig,
)
