"""Progress bars only where someone watches; Ray's INFO lines off unless -v."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from distcur import progress
from distcur.logs import FALSE_ALARM_LOGGERS, RAY_LOGGERS, setup_logging


@pytest.mark.parametrize(("flag", "expected"), [("0", False), ("off", False), ("1", True)])
def test_the_flag_decides_over_the_terminal(monkeypatch, flag, expected):
    monkeypatch.setenv(progress.ENV, flag)
    assert progress.enabled() is expected


def test_no_bar_without_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert not progress.enabled()  # pytest captures stderr: not a terminal
    for _ in progress.bar(range(3), desc="quiet"):
        pass
    assert capsys.readouterr().err == ""


def test_vae_fit_shows_its_loss(monkeypatch, capsys):
    from distcur.embed import vae
    from distcur.embed.vae import VAEConfig, train_vae

    monkeypatch.setenv(progress.ENV, "1")
    monkeypatch.setattr(vae, "bar", lambda **kw: progress.bar(**kw, mininterval=0))  # redraw on every step
    rng = np.random.default_rng(0)
    train_vae(rng.normal(size=(64, 3)), rng.normal(size=(64, 2)), VAEConfig(train_steps=60, hidden=(8,), latent_dim=2))
    err = capsys.readouterr().err
    assert "VAE fit" in err and "loss=" in err and "59/60" in err


def test_quiet_ray_unless_verbose(monkeypatch):
    monkeypatch.delenv("RAY_DATA_LOG_LEVEL", raising=False)
    monkeypatch.setenv(progress.ENV, "1")
    saved = {n: logging.getLogger(n).level for n in RAY_LOGGERS}
    try:
        setup_logging(verbose=False, show_progress=False)
        import os

        assert os.environ[progress.ENV] == "0" and not progress.enabled()
        assert os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING" and os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
        assert all(logging.getLogger(n).level == logging.WARNING for n in RAY_LOGGERS)
        hang = logging.LogRecord("ray.data.dataset", logging.WARNING, "", 0,
                                 "Warning: ... The Dataset job will hang unless more CPUs are freed up.", None, None)
        assert not logging.getLogger("ray.data.dataset").filter(hang)
        off = logging.LogRecord("ray.data._internal.progress", logging.WARNING, "", 0, "Progress bars disabled.", None,
                                None)
        assert not logging.getLogger("ray.data._internal.progress").filter(off)
        token = logging.LogRecord(FALSE_ALARM_LOGGERS[-1], logging.WARNING, "", 0,
                                  "Token authentication is enabled for this Ray cluster. Set ...", None, None)
        assert not logging.getLogger(FALSE_ALARM_LOGGERS[-1]).filter(token)
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
        for name in FALSE_ALARM_LOGGERS:
            for f in list(logging.getLogger(name).filters):
                logging.getLogger(name).removeFilter(f)
        monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)
