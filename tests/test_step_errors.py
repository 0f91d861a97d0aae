"""The step's error report (``fastprune.step_errors``): nothing the device counts is lost or reported twice."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastprune.kernels import common as K
from fastprune.step_errors import StepErrors


def record(counters: torch.Tensor, count_slot: int, *values: int) -> None:
    """What the kernel does for bad rows: count them and keep the smallest value as the example."""
    for v in values:
        counters[count_slot + 1] = K.merge_example(int(counters[count_slot + 1]), v)
    counters[count_slot] += len(values)


def report(validate: str = "async") -> StepErrors:
    return StepErrors(torch.zeros(K.ERR_SLOTS, dtype=torch.int64), num_samples=50, num_classes=10,
                      ignore_index=-100, validate=validate)


def test_a_raised_report_keeps_what_was_counted_after_its_snapshot():
    errors = report()
    record(errors.counters, K.ERR_LABEL_COUNT, 12, 11)
    snapshot = errors.counters.clone()  # the copy on its way to the host
    record(errors.counters, K.ERR_INDEX_COUNT, 77)  # counted by a later step, before the report is read
    record(errors.counters, K.ERR_LABEL_COUNT, 15)
    with pytest.raises(ValueError, match=r"labels: value 11 is outside \[0, 10\) .*\(2 bad rows"):
        errors.check(snapshot)
    with pytest.raises(ValueError, match=r"labels: value 11 .*\(1 bad rows"):  # the later one, counted once
        errors.check()
    with pytest.raises(IndexError, match=r"indices: value 77 is outside \[0, num_samples=50\) \(1 bad rows"):
        errors.check()
    errors.check()  # everything reported: nothing more to say
    assert errors.counters.tolist() == [0] * K.ERR_SLOTS


def test_two_kinds_in_one_snapshot_are_both_reported():
    errors = report()
    record(errors.counters, K.ERR_LABEL_COUNT, 12)
    record(errors.counters, K.ERR_INDEX_COUNT, 60, 61)
    snapshot = errors.counters.clone()
    with pytest.raises(ValueError, match="labels: value 12"):
        errors.check(snapshot)
    with pytest.raises(IndexError, match=r"indices: value 60 .*\(2 bad rows"):
        errors.check()  # the next report (a new snapshot)
    errors.check()


def test_a_kind_reported_in_full_starts_its_example_afresh():
    errors = report()
    for value in (11, 30):  # the smallest value is the example: 30 shows only if the report cleared 11
        record(errors.counters, K.ERR_LABEL_COUNT, value)
        with pytest.raises(ValueError, match=rf"value {value} .*\(1 bad rows"):
            errors.check()


def test_warnings_are_counted_once_and_do_not_hide_a_later_error():
    errors = report()
    record(errors.counters, K.ERR_NONFINITE_COUNT, 3)
    with pytest.warns(RuntimeWarning, match="1 rows had a non-finite loss .*batch row 3"):
        errors.check()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        errors.check()  # already reported
    record(errors.counters, K.ERR_NONFINITE_COUNT, 0)
    record(errors.counters, K.ERR_DUP_COUNT, 4)
    with pytest.warns(RuntimeWarning) as caught:
        errors.check()
    messages = [str(w.message) for w in caught]
    assert any("1 rows had a non-finite loss" in m for m in messages)  # the new one only
    assert any("sample 4 appeared twice" in m for m in messages)
    record(errors.counters, K.ERR_DUP_COUNT, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        errors.check()  # duplicates are warned about once per pruner


def test_non_finite_rows_raise_with_sync_validation():
    errors = report("sync")
    record(errors.counters, K.ERR_NONFINITE_COUNT, 5)
    with pytest.raises(ValueError, match="batch row 5"):
        errors.check()
    errors.check()


def test_new_fatal_looks_at_labels_and_indices_only():
    errors = report()
    record(errors.counters, K.ERR_NONFINITE_COUNT, 1)
    record(errors.counters, K.ERR_DUP_COUNT, 2)
    assert not errors.new_fatal(errors.counters.tolist())
    record(errors.counters, K.ERR_INDEX_COUNT, 99)
    assert errors.new_fatal(errors.counters.tolist())


def test_reset_forgets_everything():
    errors = report()
    record(errors.counters, K.ERR_LABEL_COUNT, 12)
    errors.reset()
    errors.check()
    assert errors.counters.tolist() == [0] * K.ERR_SLOTS
