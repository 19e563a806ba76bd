"""Runs the rendering tests (``test_metaworld_images.py``) in a process of their own, with
``MUJOCO_GL=osmesa`` set before mujoco is imported: OSMesa's and TensorFlow's LLVM cannot share a
process, and this suite imports TensorFlow to write TFRecord fixtures."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_rendering_tests_pass_in_their_own_process():
    env = {**os.environ, "DISTCUR_RENDER_TESTS": "1"}
    if not env.get("DISPLAY"):
        env.setdefault("MUJOCO_GL", "osmesa")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                           os.path.join(HERE, "test_metaworld_images.py")],
                          env=env, cwd=os.path.dirname(os.path.dirname(HERE)), capture_output=True, text=True,
                          timeout=1500)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    if " passed" not in proc.stdout:  # every rendering test skipped there (no OSMesa): say why
        pytest.skip(proc.stdout.strip().splitlines()[-1])
