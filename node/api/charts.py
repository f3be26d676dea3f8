"""Small inline SVG charts for the dashboard, drawn on the server.

Every value put into markup is a number formatted here or text escaped by
:func:`markupsafe.escape`; the result is :class:`markupsafe.Markup` for
Jinja2.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from node.index.dashboard import LatencySample, RecentStudy

#: Dark-theme colours (also in the template's CSS).
COLOURS = {
    "receiving": "#4c8dff",
    "waiting": "#6b7280",
    "queued": "#a78bfa",
    "running": "#f59e0b",
    "dispatch": "#34d399",
    "done": "#34d399",
    "failed": "#f87171",
    "not_applicable": "#9ca3af",
    "cancelled": "#9ca3af",
    "axis": "#4b5563",
    "text": "#cbd5e1",
}


@dataclass(frozen=True)
class Event:
    name: str
    at: dt.datetime


def timeline_events(study: RecentStudy) -> list[Event]:
    """The study's moments, in time order: first instance, last instance,
    complete, job start, job end, delivered (those that happened)."""
    job = study.job
    candidates = [
        ("first instance", study.first_received_at),
        ("last instance", study.last_received_at),
        ("complete", study.completed_at),
        ("job start", job.started_at if job else None),
        ("job end", job.finished_at if job else None),
        ("delivered", job.delivered_at if job else None),
    ]
    return [Event(name, at) for name, at in candidates if at is not None]


# The bar between two moments is coloured by what happened in it.
_SPANS = {
    ("first instance", "last instance"): "receiving",
    ("last instance", "complete"): "waiting",
    ("complete", "job start"): "queued",
    ("last instance", "job start"): "queued",
    ("job start", "job end"): "running",
    ("job end", "delivered"): "dispatch",
}


def timeline_svg(study: RecentStudy, width: int = 240, height: int = 26) -> Markup:
    """A bar from the first instance to the delivery, to scale in seconds,
    one colour per phase, a tick and a tooltip per moment, total at the end."""
    events = timeline_events(study)
    if not events:
        return Markup("")
    t0 = events[0].at
    offsets = [(e.at - t0).total_seconds() for e in events]
    total = max(offsets[-1], 1e-3)
    bar_w = width - 52
    x = [round(2 + bar_w * min(1.0, max(0.0, o / total)), 1) for o in offsets]
    parts = [f'<svg class="timeline" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    parts.append(f'<rect x="2" y="9" width="{bar_w}" height="8" rx="2" fill="{COLOURS["axis"]}" opacity="0.35"/>')
    for i in range(1, len(events)):
        phase = _SPANS.get((events[i - 1].name, events[i].name), "waiting")
        w = max(x[i] - x[i - 1], 0.0)
        if w > 0:
            parts.append(
                f'<rect x="{x[i - 1]}" y="9" width="{w}" height="8" fill="{COLOURS[phase]}">'
                f"<title>{escape(phase)}: {offsets[i] - offsets[i - 1]:.1f} s</title></rect>"
            )
    for event, xi, off in zip(events, x, offsets, strict=True):
        parts.append(
            f'<line x1="{xi}" x2="{xi}" y1="5" y2="21" stroke="{COLOURS["text"]}" stroke-width="1">'
            f"<title>{escape(event.name)}: +{off:.1f} s ({event.at:%H:%M:%S} UTC)</title></line>"
        )
    parts.append(
        f'<text x="{width - 2}" y="17" text-anchor="end" font-size="11" fill="{COLOURS["text"]}">'
        f"{_seconds(offsets[-1])}</text></svg>"
    )
    return Markup("".join(parts))


def _seconds(s: float) -> str:
    if s < 100:
        return f"{s:.1f} s"
    if s < 6000:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation between
    closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low, high = math.floor(k), math.ceil(k)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def throughput_svg(
    finished: Sequence[tuple[dt.datetime, str, str]], now: dt.datetime, width: int = 400, height: int = 110
) -> Markup:
    """Jobs finished per hour over the 24 hours before ``now``, stacked by
    outcome (done, not_applicable, failed)."""
    order = ("done", "not_applicable", "cancelled", "failed")
    bins = [dict.fromkeys(order, 0) for _ in range(24)]
    start = now - dt.timedelta(hours=24)
    for at, _pipeline, state in finished:
        i = int((at - start).total_seconds() // 3600)
        if 0 <= i < 24 and str(state) in bins[i]:
            bins[i][str(state)] += 1
    peak = max([sum(b.values()) for b in bins] + [1])
    plot_h, left, bottom = height - 22, 44, height - 16
    bw = (width - left - 4) / 24
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img">']
    parts.append(_axis(left, bottom, width, plot_h, f"{peak}"))
    for i, b in enumerate(bins):
        y = float(bottom)
        for state in order:
            n = b[state]
            if n:
                h = plot_h * n / peak
                y -= h
                hour = (start + dt.timedelta(hours=i + 1)).strftime("%H:00")
                parts.append(
                    f'<rect x="{left + i * bw + 1:.1f}" y="{y:.1f}" width="{bw - 2:.1f}" height="{h:.1f}" '
                    f'fill="{COLOURS[state]}"><title>{n} {state} in the hour to {hour} UTC</title></rect>'
                )
    parts.append(_hour_labels(left, bw, bottom, start))
    parts.append("</svg>")
    return Markup("".join(parts))


def latency_svg(samples: Sequence[LatencySample], now: dt.datetime, width: int = 400, height: int = 110) -> Markup:
    """Seconds from last instance to delivered, one dot per job at its
    delivery time over the last 24 hours, with the median and p95 lines."""
    start = now - dt.timedelta(hours=24)
    values = [s.seconds for s in samples]
    peak = max(values + [1.0]) * 1.1
    plot_h, left, bottom = height - 22, 44, height - 16
    plot_w = width - left - 4
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img">']
    parts.append(_axis(left, bottom, width, plot_h, _seconds(peak)))
    for name, q, colour in (("median", 50, COLOURS["dispatch"]), ("p95", 95, COLOURS["running"])):
        v = percentile(values, q)
        if v is not None:
            y = bottom - plot_h * v / peak
            parts.append(
                f'<line x1="{left}" x2="{width - 4}" y1="{y:.1f}" y2="{y:.1f}" stroke="{colour}" '
                f'stroke-dasharray="4 3"><title>{name} {v:.1f} s</title></line>'
            )
    for s in samples:
        cx = left + plot_w * max(0.0, min(1.0, (s.delivered_at - start).total_seconds() / 86400))
        cy = bottom - plot_h * s.seconds / peak
        parts.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{COLOURS["receiving"]}">'
            f"<title>job {s.job_id} ({escape(s.pipeline)}): {s.seconds:.1f} s</title></circle>"
        )
    parts.append(_hour_labels(left, plot_w / 24, bottom, start))
    parts.append("</svg>")
    return Markup("".join(parts))


def _axis(left: float, bottom: float, width: float, plot_h: float, top_label: str) -> str:
    c = COLOURS["axis"]
    return (
        f'<line x1="{left}" x2="{width - 4}" y1="{bottom}" y2="{bottom}" stroke="{c}"/>'
        f'<line x1="{left}" x2="{left}" y1="{bottom - plot_h}" y2="{bottom}" stroke="{c}"/>'
        f'<text x="{left - 3}" y="{bottom - plot_h + 8}" text-anchor="end" font-size="9" '
        f'fill="{COLOURS["text"]}">{escape(top_label)}</text>'
    )


def _hour_labels(left: float, bw: float, bottom: float, start: dt.datetime) -> str:
    out = []
    for i in range(0, 25, 6):
        label = "now" if i == 24 else (start + dt.timedelta(hours=i)).strftime("%H:%M")
        anchor = "end" if i == 24 else "middle"
        out.append(
            f'<text x="{left + i * bw:.1f}" y="{bottom + 12}" text-anchor="{anchor}" font-size="9" '
            f'fill="{COLOURS["text"]}">{label}</text>'
        )
    return "".join(out)
