"""Start-up coordination through the store: no deadline, a waiting rank says what it waits for, one rank's error
stops the others with the same message."""

from __future__ import annotations

import logging
import threading

import pytest
import torch.distributed as dist

from merak_lora.config import ConfigError
from merak_lora.coordinate import Coordinator, PeerFailed


def pair(report_s: float = 30.0) -> tuple[Coordinator, Coordinator]:
    store = dist.HashStore()
    return (Coordinator(store, 0, 2, poll_s=0.01, report_s=report_s),
            Coordinator(store, 1, 2, poll_s=0.01, report_s=report_s))


def test_a_waiting_rank_names_what_it_waits_for(caplog):
    a, b = pair(report_s=0.05)
    late = threading.Timer(0.3, lambda: b.barrier("loaded", "reading its stage"))
    late.start()
    with caplog.at_level(logging.INFO, logger="merak_lora"):
        logging.getLogger("merak_lora").propagate = True
        try:
            a.barrier("loaded", "reading its stage")
        finally:
            logging.getLogger("merak_lora").propagate = False
    late.join()
    assert "rank 0 waiting for rank(s) 1 to finish reading its stage" in caplog.text


def test_one_rank_s_user_error_stops_the_others_with_the_same_message():
    a, b = pair()
    threading.Timer(0.1, lambda: b.fail("data.jsonl, line 7: missing field 'output'")).start()
    with pytest.raises(ConfigError, match="data.jsonl, line 7: missing field 'output'"):
        a.barrier("loaded", "reading its stage")


def test_a_crash_elsewhere_is_named_with_its_rank():
    a, b = pair()
    b.fail("RuntimeError: CUDA out of memory", user_error=False)
    with pytest.raises(PeerFailed, match="rank 1 failed: RuntimeError: CUDA out of memory"):
        a.wait(["never"], lambda: "nothing")


def test_the_first_error_wins():
    a, b = pair()
    b.fail("first")
    a.fail("second")
    with pytest.raises(ConfigError, match="^first$"):
        a.raise_if_failed()


def _check_gpus(gpus: list[tuple[str, str]]) -> list[str]:
    """check_a_gpu_each on two ranks (threads on one store) given these (host, GPU); what each rank raised."""
    from merak_lora.layout import check_a_gpu_each
    raised = ["", ""]

    def rank(c: Coordinator) -> None:
        try:
            check_a_gpu_each(c, *gpus[c.rank], 4)
        except ConfigError as e:
            raised[c.rank] = str(e)
    threads = [threading.Thread(target=rank, args=(c,), daemon=True) for c in pair()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a rank still waits at the check's barrier"
    return raised


def test_two_ranks_given_one_gpu_both_stop_with_the_launch_that_fixes_it():
    raised = _check_gpus([("node1", "GPU-aa"), ("node1", "GPU-aa")])
    assert raised[0] == raised[1] != ""
    assert "on node1 were given the same GPU" in raised[0] and "--nproc_per_node 4" in raised[0]


def test_ranks_on_gpus_of_their_own_go_on():
    assert _check_gpus([("node1", "GPU-aa"), ("node1", "GPU-bb")]) == ["", ""]
