"""Log set-up of the CLI: distcur's own lines at INFO, Ray's at WARNING unless ``-v``.

Ray logs through its own handlers (``propagate=False``) and resets the levels of the ``ray``
and ``ray.data`` loggers when it starts, so the quiet default sets what survives that: the
levels of Ray's child loggers, ``RAY_DATA_LOG_LEVEL`` (read when Ray Data configures its
logger) and no Ray Data progress bars (one line per update without a terminal, lines per
operator left on a terminal; the stage's own distcur bar shows the progress instead).
Warnings and errors, workers' task errors included, are still shown.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from distcur import progress

# Ray's loggers below "ray" that print start-up, scheduling and progress lines at INFO.
RAY_LOGGERS = ("ray._private", "ray._common", "ray.util", "ray.air", "ray.train", "ray.tune", "ray.runtime_env",
               "ray.autoscaler", "ray.dashboard")


class _BarSafeHandler(logging.StreamHandler):
    """Writes through tqdm so that a log line does not break a progress bar drawn on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise into the stage
            self.handleError(record)


FALSE_ALARMS = ("will hang unless more CPUs", "Progress bars disabled", "Token authentication is enabled")
# the loggers those come from (a logger's filters see only its own records, not its children's)
FALSE_ALARM_LOGGERS = ("ray.data.dataset", "ray.data._internal.progress",
                       "ray._private.authentication.authentication_token_setup")


class _DropFalseAlarms(logging.Filter):
    """Ray Data warns "The Dataset job will hang unless more CPUs are freed" whenever every CPU is
    busy at the moment it starts, which on a small machine is normal: the job waits and runs; and
    "Progress bars disabled" when the quiet default turned them off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(alarm in message for alarm in FALSE_ALARMS)


def setup_logging(verbose: bool = False, show_progress: bool = True) -> None:
    """Root logging for the CLI; Ray quiet unless ``verbose``; bars off unless ``show_progress``."""
    if not show_progress:
        os.environ[progress.ENV] = "0"
    handler = _BarSafeHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"
                                           if verbose else "%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    if verbose:
        return
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in FALSE_ALARM_LOGGERS:
        logging.getLogger(name).addFilter(_DropFalseAlarms())
    # MetaWorld's scripted experts warn about their own gains on every import; nothing to act on.
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    # Ray Data's bars are one line per update without a terminal, and one line per operator that stays
    # on it at a terminal; distcur's own bar over the stage moves instead (-v shows Ray Data's).
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
