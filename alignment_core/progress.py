"""Progress bars on a terminal only: a bar redraws itself with carriage returns, which in a log file (a worker's,
a redirected run's) become one garbled line per redraw.

`ALIGNMENT_CORE_PROGRESS` decides: `1` shows bars, `0` hides them, unset shows them when stderr (where tqdm
writes) is a terminal. The command line's `--progress/--no-progress` sets it, so a process the run starts
follows. The library's own bars come from `bar`; the bars of transformers (loading and writing weights),
huggingface_hub (downloads) and datasets follow the same rule through `apply_to_libraries`, which runs where a
model or a hub dataset loads and whenever the setting changes.
"""

import os
import sys

from tqdm.auto import tqdm

SETTING = "ALIGNMENT_CORE_PROGRESS"


def enabled() -> bool:
    setting = os.environ.get(SETTING, "").strip().lower()
    if setting in ("1", "true", "on"):
        return True
    if setting in ("0", "false", "off"):
        return False
    if setting:
        raise ValueError(f"{SETTING}={os.environ[SETTING]!r}: expected 1 (show progress bars), 0 (hide them) or "
                         "unset (show them on a terminal only)")
    return sys.stderr.isatty()


def bar(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """A tqdm bar, hidden where bars are off (see the module docstring) or where `disable` (another process's
    share of the work, say)."""
    return tqdm(iterable, disable=disable or not enabled(), **kwargs)


def set_enabled(show: bool | None) -> None:
    """True/False: always/never show bars; None: leave the setting as the environment has it."""
    if show is not None:
        os.environ[SETTING] = "1" if show else "0"
    apply_to_libraries()


def apply_to_libraries() -> None:
    from huggingface_hub import utils as hub_utils

    show = enabled()
    (hub_utils.enable_progress_bars if show else hub_utils.disable_progress_bars)()
    # transformers only once imported (models.py applies this again after it imports it): importing it here
    # would cost a command line's start 1-2 s before its first checks.
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        (transformers_logging.enable_progress_bar if show else transformers_logging.disable_progress_bar)()
    if "datasets" in sys.modules:  # imported: it reads its switch from here on, not from the environment
        import datasets

        (datasets.enable_progress_bars if show else datasets.disable_progress_bars)()
    else:
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "0" if show else "1"

