"""The console filter on the consoles of real runs (tests/fixtures/console).

ddp_2procs.txt and deepspeed_2procs.txt are what `dvc exp run -S train.strategy=ddp|deepspeed
-S train.procs_per_node=2` printed (tiny params, a fresh project copy, CPU; only the checkout's path
replaced). c10d_no_dns.txt is PyTorch's c10d warning as a rank prints it when its network has no DNS
(a TCPStore client in a network namespace with no route to a name server, as the nodes of the simulated
cluster are). Each NAME.console next to them is what the console must show: the capture without the
chatter, checked line by line by hand.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from virgo_exps.launch.console import CHATTER, ConsoleFilter, chatter_reason, is_chatter, tee

FIXTURES = Path(__file__).parent / "fixtures" / "console"
CAPTURES = sorted(FIXTURES.glob("*.txt"))
# Lines a user runs the pipeline for: stages, progress, results, where things are.
PROGRESS = re.compile(
    r"^(Running stage|Stage '|Ran experiment|epoch \d+/\d+: |launch: |mlflow: run |train: |report: |environment: |"
    r"generate: |\[generate\] |\[preprocess\] )"
)


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_fixtures_are_there():
    assert {p.name for p in CAPTURES} == {"ddp_2procs.txt", "deepspeed_2procs.txt", "c10d_no_dns.txt"}


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
def test_log_gets_every_byte_and_the_console_no_chatter(capture):
    raw = capture.read_bytes()
    log, console = io.BytesIO(), io.BytesIO()
    tee(io.BytesIO(raw), log, console, ConsoleFilter(enabled=True))
    assert log.getvalue() == raw
    assert console.getvalue().decode() == capture.with_suffix(".console").read_text()


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
@pytest.mark.parametrize("size", [1, 5, 64, 1 << 20])
def test_chunks_of_a_followed_log_give_the_same_console(capture, size):
    raw = capture.read_bytes()
    filt = ConsoleFilter(enabled=True)
    shown = b"".join(filt.feed(raw[i : i + size]) for i in range(0, len(raw), size)) + filt.flush()
    assert shown.decode() == capture.with_suffix(".console").read_text()


def test_every_kind_of_chatter_was_seen_in_a_real_run():
    seen = {chatter_reason(line) for capture in CAPTURES for line in lines_of(capture)}
    assert {why for why, _ in CHATTER} <= seen


def test_progress_and_results_are_never_chatter():
    progress = [line for capture in CAPTURES for line in lines_of(capture) if PROGRESS.match(line)]
    assert len(progress) > 30
    assert [line for line in progress if is_chatter(line)] == []
    for capture in CAPTURES:  # and all of them reach the console
        shown = set(lines_of(capture.with_suffix(".console")))
        assert [line for line in lines_of(capture) if PROGRESS.match(line) and line not in shown] == []


def test_the_summary_printed_twice_is_shown_once():
    [first, second] = [line for line in lines_of(FIXTURES / "ddp_2procs.txt") if "'n_samples': 40" in line]
    assert not is_chatter(second)  # not chatter by itself: a repeat of the line before
    filt = ConsoleFilter(enabled=True)
    assert filt.show(first.encode() + b"\n") is not None
    assert filt.show(second.encode() + b"\n") is None
    assert ConsoleFilter(enabled=True).show(second.encode() + b"\n") is not None  # alone it is shown


def test_probe_messages_merged_into_a_line_are_cut_out_of_it():
    probe = "USDT:2026-11-30 14:46:15 18096:18096 SyncActivityProfilerHandler.cpp:59] profiler_stop"
    filt = ConsoleFilter(enabled=True)
    text = f"{probe}epoch 1/2: train_loss 1.0521\n\nnext\n".encode()
    assert filt.feed(text) == b"epoch 1/2: train_loss 1.0521\nnext\n"  # and the probe's own newline


def test_virgo_console_all_shows_everything(monkeypatch):
    monkeypatch.setenv("VIRGO_CONSOLE", "all")
    for capture in CAPTURES:
        raw = capture.read_bytes()
        console = io.BytesIO()
        tee(io.BytesIO(raw), io.BytesIO(), console)
        assert console.getvalue() == raw
    monkeypatch.delenv("VIRGO_CONSOLE")
    assert ConsoleFilter().enabled


def test_a_closed_console_does_not_stop_the_log():
    raw = (FIXTURES / "ddp_2procs.txt").read_bytes()
    console = io.BytesIO()
    console.close()
    log = io.BytesIO()
    tee(io.BytesIO(raw), log, console, ConsoleFilter(enabled=True))
    assert log.getvalue() == raw


def test_a_last_line_without_newline_comes_out_of_flush():
    filt = ConsoleFilter(enabled=True)
    assert filt.feed(b"epoch 1/2: done") == b""
    assert filt.flush() == b"epoch 1/2: done"
    assert filt.feed(b"DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully") == b""
    assert filt.flush() == b""
