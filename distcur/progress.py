"""Progress bars on stderr for the stages that take more than a few seconds.

A bar shows only where someone watches: stderr is a terminal and ``DISTCUR_PROGRESS`` is not
``0`` (``distcur --no-progress`` sets it to 0; ``1`` forces bars on). Test logs, CI and Ray
workers (whose stderr is a file) get none, so they stay short.
"""

from __future__ import annotations

import os
import sys

ENV = "DISTCUR_PROGRESS"


def enabled() -> bool:
    """Whether bars are drawn in this process."""
    flag = os.environ.get(ENV)
    if flag is not None:
        return flag.strip().lower() not in ("0", "false", "no", "off")
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(iterable=None, *, total: int | None = None, desc: str, unit: str = "it", disable: bool = False, **kwargs):
    """A tqdm bar on stderr (a no-op object when ``disable`` or :func:`enabled` is false);
    ``set_postfix`` on it shows a running value such as the loss."""
    from tqdm import tqdm

    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable or not enabled(),
                leave=False, dynamic_ncols=True, **kwargs)
