"""SIGINT / SIGTERM during training (:mod:`aimkp.runs.signals`): the handler records the signal,
the ranks agree on stopping (:meth:`DistContext.any_rank`), a second Ctrl-C stops at once, the
previous handlers come back, the exit status is the shell's 128 + signal."""

from __future__ import annotations

import signal

import pytest

from aimkp.runs.signals import StopRequest, exit_status
from aimkp.train.distributed import DistContext


def test_a_signal_is_recorded_and_the_handlers_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    single = DistContext()
    with StopRequest() as stop:
        assert stop.agreed(single.any_rank) is None
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        assert stop.agreed(single.any_rank) == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_another_ranks_signal_stops_this_one_too() -> None:
    with StopRequest() as stop:
        assert stop.agreed(lambda mine: mine) is None
        assert stop.agreed(lambda mine: True) == signal.SIGTERM  # only another rank got one
        signal.raise_signal(signal.SIGINT)
        assert stop.agreed(lambda mine: True) == signal.SIGINT  # this rank's own signal


def test_a_second_ctrl_c_stops_at_once() -> None:
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_exit_status_is_128_plus_the_signal() -> None:
    assert exit_status(signal.SIGINT) == 130 and exit_status(signal.SIGTERM) == 143
