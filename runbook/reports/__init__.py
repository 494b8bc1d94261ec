"""Drill reports: what a run of the features proved, as data (report.json) and as a page.

    model        the report's data, built and read; summary, attention, time to recover
    output       write/load a report directory (report.json + report.html)
    page         the HTML page (runbook/templates/report.html.j2, autoescaped)
    timeline     the SVG timeline of an engine run
    fingerprint  what ran the drill, asked of the live tools (the only part that runs any)

Nothing here is used on a host during a rollback; runbook/report.py keeps the old names.
"""
