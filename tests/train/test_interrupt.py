"""Ctrl-C held back over a critical section, and a checkpoint save that a Ctrl-C no longer cuts short."""

import dataclasses
import os
import signal
import threading

import pytest

from aoe_ep.config import load_config
from aoe_ep.model import Decoder
from aoe_ep.parallel.runtime import setup_runtime, teardown
from aoe_ep.train import checkpoint as ckpt
from aoe_ep.train.interrupt import sigint_deferred
from aoe_ep.train.optim import build_optimizer, build_scheduler


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Python's own SIGINT handler, as in a process started from a terminal, whatever this one inherited (a
    shell's background job starts with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_one_ctrl_c_is_raised_after_the_section_with_the_handler_restored(capfd):
    finished = False
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred("writing something") as held:
            _ctrl_c()
            finished = True
    assert finished and held.count == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    err = capfd.readouterr().err
    assert "aoe-ep: Ctrl-C: writing something first (Ctrl-C again to abandon it)" in err


def test_a_second_ctrl_c_abandons_the_section():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            _ctrl_c()
            reached.append(1)
            _ctrl_c()
            reached.append(2)
    assert reached == [1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_ctrl_c_no_interruption_and_errors_pass_through():
    with sigint_deferred() as held:
        pass
    assert held.count == 0
    with pytest.raises(ValueError):
        with sigint_deferred():
            raise ValueError("boom")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_someone_else_installed_is_left_alone():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda *_: seen.append(1))
    try:
        with sigint_deferred() as held:
            _ctrl_c()
        assert seen == [1] and held.count == 0
    finally:
        signal.signal(signal.SIGINT, previous)


def test_outside_the_main_thread_nothing_changes():
    handlers = []

    def body():
        with sigint_deferred():
            handlers.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert handlers == [signal.default_int_handler]


def test_ctrl_c_during_a_checkpoint_write_completes_it_then_interrupts(tmp_path, monkeypatch):
    """Without the deferral the interruption lands inside DCP's write: raised before the write (no checkpoint),
    swallowed by the serializer, or reported as a failed write."""
    cfg = load_config("tiny")
    train = dataclasses.replace(cfg.train, device="cpu")
    runtime = setup_runtime(train, 1)
    try:
        model = Decoder(cfg.model, cfg.moe, ep_group=runtime.groups.ep_group)
        optimizer = build_optimizer(model, train, runtime.device)
        scheduler = build_scheduler(optimizer, train)
        state = ckpt.training_state(model, optimizer, scheduler, {"step": 3, "consumed_samples": 0}, runtime)
        save = ckpt.dcp.save

        def interrupted_save(*args, **kwargs):
            _ctrl_c()
            return save(*args, **kwargs)

        monkeypatch.setattr(ckpt.dcp, "save", interrupted_save)
        root = tmp_path / "checkpoints"
        with pytest.raises(KeyboardInterrupt):
            ckpt.save_checkpoint(root, 3, state, runtime, {"step": 3, "consumed_samples": 0}, "seed: 1\n")
        assert ckpt.latest_checkpoint(root) == root / ckpt.step_name(3)
        assert ckpt.read_meta(root / ckpt.step_name(3))["step"] == 3
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        teardown(runtime)
