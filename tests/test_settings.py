"""sclcm.settings and sclcm.logging."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import pytest
import torch

import sclcm
from sclcm import logging as logg
from sclcm import settings


@pytest.mark.parametrize(("value", "name", "level"),
                         [(0, "error", logging.ERROR), ("warning", "warning", logging.WARNING),
                          (2, "info", logging.INFO), ("hint", "hint", 15),
                          (4, "debug", logging.DEBUG), ("3", "hint", 15)])
def test_verbosity_sets_logger_level(value, name, level):
    settings.verbosity = value
    assert settings.verbosity == name
    assert logging.getLogger("sclcm").level == level


@pytest.mark.parametrize("bad", [5, "loud", -1, None])
def test_bad_verbosity(bad):
    with pytest.raises(ValueError, match="verbosity must be one of"):
        settings.verbosity = bad


def test_progress_must_be_bool():
    settings.progress = True
    assert settings.progress is True
    with pytest.raises(TypeError, match="True or False"):
        settings.progress = "yes"


def test_device():
    settings.device = "auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert settings.resolve_device().type == expected
    assert settings.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="torch device"):
        settings.device = "tpu:banana"


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-CUDA message")
def test_cuda_requested_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA is not available; use 'cpu'"):
        settings.resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_device_resolves():
    assert settings.resolve_device("cuda").type == "cuda"


def test_logging_levels_and_elapsed_time():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("sclcm")
    logger.addHandler(handler)
    try:
        settings.verbosity = "info"
        start = logg.info("starting")
        logg.info("finished", time=start - timedelta(seconds=65))
        logg.hint("hidden at info")
        logg.warning("careful")
        settings.verbosity = "hint"
        logg.hint("shown at hint")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "starting", "finished (0:01:05)", "WARNING: careful", "--> shown at hint"]
    assert isinstance(start, datetime)


def test_repr_and_version():
    assert "verbosity=" in repr(settings)
    assert sclcm.__version__
