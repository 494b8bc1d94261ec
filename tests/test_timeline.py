"""The drill report's timeline SVG (templates/timeline.svg.j2): what a run record says comes
out as text, never as markup, escaped once. The oracle is Python's HTML parser on the output
and the literal strings of the record. No Docker."""

from __future__ import annotations

from html.parser import HTMLParser

from runbook.reports.timeline import timeline_svg

EVIL = '<script>alert("x")</script> & \'quoted\''


class Read(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.text.append(data)


def run_record() -> dict[str, object]:
    def step(name: str, second: float, ms: int, status: str = "ok",
             error: str | None = None) -> dict[str, object]:
        return {"name": name, "title": name, "status": status, "duration_ms": ms,
                "started_at": f"2026-01-01T00:00:{second:06.3f}Z", "error": error}

    return {"action": "rollback", "run_id": "rbk_a&b", "outcome": "failed",
            "started_at": "2026-01-01T00:00:00.000Z",
            "steps": [step("lock", 0.0, 10), step(EVIL, 0.5, 200, "failed", error=EVIL)],
            "traffic": {"clients": 2, "requests": 9, "non_2xx": 1, "failed": 0, "resets": 1,
                        "bucket_ms": 50, "buckets": [[4, 0, 0], [3, 1, 1]],
                        "longest_gap_ms": 30, "longest_gap_at_ms": 20, "slowest_ms": 12}}


def test_a_hostile_step_name_and_error_stay_text() -> None:
    svg = timeline_svg(run_record())
    read = Read()
    read.feed(svg)
    assert "script" not in {tag for tag, _ in read.tags}
    assert EVIL in read.text  # the bar's label, as written in the record
    (phase,) = [a for t, a in read.tags if t == "g" and a.get("data-status") == "failed"]
    assert phase["data-phase"] == EVIL
    assert any(EVIL in text and "takes 200 ms" in text for text in read.text)  # the tooltip


def test_the_title_is_escaped_once() -> None:
    read = Read()
    read.feed(timeline_svg(run_record()))
    (svg,) = [a for t, a in read.tags if t == "svg"]
    assert svg["data-run-id"] == "rbk_a&b"
    assert svg["aria-label"].startswith("rollback rbk_a&b: failed, ")  # not rbk_a&amp;b


def test_bars_and_the_users_row_carry_the_record_s_numbers() -> None:
    read = Read()
    read.feed(timeline_svg(run_record()))
    phases = [a for t, a in read.tags if t == "g" and "phase" in a.get("class", "").split()]
    assert [(p["data-offset-ms"], p["data-duration-ms"]) for p in phases] == [
        ("0", "10"), ("500", "200")]
    (users,) = [a for t, a in read.tags if t == "g" and a.get("class") == "traffic"]
    assert (users["data-requests"], users["data-non-2xx"], users["data-resets"],
            users["data-longest-gap-ms"]) == ("9", "1", "1", "30")
    assert [a.get("class") for t, a in read.tags if t == "rect" and a.get("class") in (
        "bad", "reset", "gap")] == ["bad", "reset", "gap"]
