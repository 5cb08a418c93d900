"""Progress reporting: a bar at a terminal, log lines in a job log, nothing when asked."""

import logging
import sys

import pytest
import torch

from pcc_dist import progress as progress_module
from pcc_dist.evaluation import embed_sentences
from pcc_dist.progress import LogProgress, progress, progress_enabled

LOGGER = "pcc_dist.progress"


@pytest.fixture
def no_terminal(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)


def test_progress_bar_is_off_in_ci_and_off_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setenv("CI", "true")
    assert progress_enabled() is False
    monkeypatch.setenv("CI", "")
    assert progress_enabled() is True
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress_enabled() is False


def test_log_progress_reports_counts_rate_and_time_left(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with LogProgress(10, "embed", "sent", every=0.0) as bar:
        for _ in range(5):
            bar.update(2)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    # One line per update except the last (the loop is done: its result says so).
    assert len(lines) == 4
    assert lines[0].startswith("embed: 2/10 sent (") and "sent/s, about" in lines[0]
    assert lines[-1].startswith("embed: 8/10 sent")


def test_log_progress_waits_for_its_interval(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    bar = LogProgress(100, "embed", "sent", every=3600.0)
    for _ in range(50):
        bar.update(1)
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_off_a_terminal_embedding_logs_progress_and_silent_means_silent(
        no_terminal, monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "LOG_EVERY_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger=LOGGER)
    sentences = [f"sentence {i}" for i in range(6)]

    def embed(batch):
        return torch.ones(len(batch), 3)

    assert isinstance(progress(6, "embed", "sent", True), LogProgress)
    embed_sentences(embed, sentences, batch_size=2)  # default: report progress
    reported = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert [line.split(" (")[0] for line in reported] == ["embed: 2/6 sent", "embed: 4/6 sent"]
    caplog.clear()
    embed_sentences(embed, sentences, batch_size=2, show_progress=False)
    assert not [r for r in caplog.records if r.name == LOGGER]
