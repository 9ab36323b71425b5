"""benchmarks.step_ops' comparison: a call that one tree makes more often, or on other shapes, is reported."""

from __future__ import annotations

from benchmarks.step_ops import compare


def test_same_calls_report_nothing_and_extra_calls_are_named() -> None:
    before = {"ops": {"aten::mm [[8, 4], [4, 4]]": [10, 1.0], "aten::add [[8, 4], [8, 4]]": [5, 0.5]}}
    same = {"ops": {"aten::mm [[8, 4], [4, 4]]": [10, 1.2], "aten::add [[8, 4], [8, 4]]": [5, 0.4]}}
    result = compare(before, same)
    assert result["differing_counts"] == {}
    assert result["calls"] == [15, 15]
    assert abs(result["self_cpu_ratio"] - 1.6 / 1.5) < 1e-12

    # One more matmul, and an add on a bigger shape instead of the old one.
    changed = {"ops": {"aten::mm [[8, 4], [4, 4]]": [11, 1.1], "aten::add [[16, 4], [16, 4]]": [5, 0.9]}}
    differing = compare(before, changed)["differing_counts"]
    assert differing == {"aten::mm [[8, 4], [4, 4]]": [10, 11], "aten::add [[8, 4], [8, 4]]": [5, 0],
                         "aten::add [[16, 4], [16, 4]]": [0, 5]}
