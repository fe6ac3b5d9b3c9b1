"""The demo's narration: pure formatting of what the stream and the simulated users did."""

from __future__ import annotations

from recsys_cli.demo import traffic_summary
from recsys_sim.traffic import TrafficReport


def test_the_minute_summary_adds_up_every_traffic_chunk() -> None:
    first, second = TrafficReport(requests=100, failures=1), TrafficReport(requests=50)
    first.count("champion", "impression", 800)
    first.count("champion", "click", 200)
    second.count("champion", "impression", 200)
    second.count("challenger", "impression", 100)
    second.count("challenger", "click", 10)
    assert traffic_summary(12345, [first, second]) == (
        "12,345 events streamed; 150 requests (1 failed); CTR challenger 10.0%, champion 20.0%"
    )
    assert traffic_summary(0, []) == "0 events streamed; 0 requests (0 failed); CTR not yet measured"
