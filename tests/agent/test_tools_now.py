"""The now tool: the batch's logical time, not the wall clock."""

from datetime import UTC, datetime, timedelta

import pytest

from k2batch.agent.tools import TOOLS, ToolContext, ToolSettings, parse_logical_time


def test_now_returns_the_logical_time() -> None:
    ctx = ToolContext.for_job("job-1", "draft", ToolSettings(now="2030-02-03T04:05:06+02:00"))
    result = TOOLS.call("now", "{}", ctx, 1.0, 100)
    assert (result.content, result.error_type) == ("2030-02-03T04:05:06+02:00", None)
    assert TOOLS.call("now", "{}", ctx, 1.0, 100).content == result.content  # replays are exact


def test_logical_time_parsing() -> None:
    assert parse_logical_time("2030-02-03T04:05:06") == datetime(2030, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert parse_logical_time("2030-02-03T04:05:06Z").tzinfo == UTC
    assert parse_logical_time("2030-02-03T04:05:06-05:00").utcoffset() == timedelta(hours=-5)
    with pytest.raises(ValueError, match=r"tools\.now: 'yesterday' is not an ISO 8601 timestamp"):
        parse_logical_time("yesterday")
