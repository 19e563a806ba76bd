"""Progress bars on stderr for the stages that take more than a few seconds.

A bar shows only where someone watches: stderr is a terminal and ``DISTCUR_PROGRESS`` is not
``0`` (``distcur --no-progress`` sets it to 0; ``1`` forces bars on). Test logs, CI and Ray
workers (whose stderr is a file) get none, so they stay short.

tqdm redraws a bar only when it is updated, so a bar over work that takes minutes per step (a
policy job, a datamodel batch) would sit still; every bar here is also redrawn every
``refresh_s`` seconds (2 by default) while it is open, so its elapsed time keeps moving.
"""

from __future__ import annotations

import os
import sys
import threading

ENV = "DISTCUR_PROGRESS"


def enabled() -> bool:
    """Whether bars are drawn in this process."""
    flag = os.environ.get(ENV)
    if flag is not None:
        return flag.strip().lower() not in ("0", "false", "no", "off")
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


REFRESH_S = 2.0


def bar(iterable=None, *, total: int | None = None, desc: str, unit: str = "it", disable: bool = False,
        refresh_s: float | None = None, **kwargs):
    """A tqdm bar on stderr (a no-op object when ``disable`` or :func:`enabled` is false);
    ``set_postfix`` on it shows a running value such as the loss. While open it is redrawn at
    least every ``refresh_s`` seconds (None: :data:`REFRESH_S`; 0: only when updated)."""
    from tqdm import tqdm

    kwargs.setdefault("mininterval", 0.5)
    t = tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable or not enabled(),
             leave=False, dynamic_ncols=True, **kwargs)
    refresh_s = REFRESH_S if refresh_s is None else refresh_s
    if not t.disable and refresh_s > 0:
        _start_refresher(t, refresh_s)
    return t


def _start_refresher(t, every_s: float) -> None:
    """Redraw ``t`` every ``every_s`` seconds from a daemon thread until it is closed."""
    stop = threading.Event()
    close = t.close

    def loop() -> None:
        while not stop.wait(every_s):
            if getattr(t, "disable", True):  # closed
                return
            try:
                t.refresh()
            except Exception:  # a redraw racing the bar's close must never raise
                return

    def close_and_stop() -> None:
        stop.set()
        close()

    t.close = close_and_stop
    threading.Thread(target=loop, name=f"refresh {t.desc}", daemon=True).start()
