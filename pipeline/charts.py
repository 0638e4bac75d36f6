"""The report's charts as small SVG documents, written in milliseconds.

matplotlib drew the same four kinds of chart, but importing it and rendering three PNGs took
about 2 s of every job's wall time (a 30,000-row job runs in ~8 s). These need only lines,
bars and labelled axes, so they are drawn here: one frame with ticks, then the marks.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["line_chart", "histogram", "bar_chart"]

W, H = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 90, 20, 34, 48
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values spanning [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.0e}"
    return f"{v:,.6g}" if abs(v) >= 1 else f"{v:.4g}"


class _Frame:
    """Axes mapping data to pixels, linear or log (base 2 or 10) on either axis."""

    def __init__(self, x: tuple[float, float], y: tuple[float, float], x_log: int = 0, y_log: int = 0) -> None:
        self.x_log, self.y_log = x_log, y_log
        self.x0, self.x1 = self._t(x[0], x_log), self._t(x[1], x_log)
        self.y0, self.y1 = self._t(y[0], y_log), self._t(y[1], y_log)
        if self.x1 == self.x0:
            self.x0, self.x1 = self.x0 - 1, self.x1 + 1
        if self.y1 == self.y0:
            self.y0, self.y1 = self.y0 - 1, self.y1 + 1

    @staticmethod
    def _t(v: float, base: int) -> float:
        return math.log(max(v, 1e-300), base) if base else v

    def px(self, x: float) -> float:
        return LEFT + (self._t(x, self.x_log) - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT)

    def py(self, y: float) -> float:
        return H - BOTTOM - (self._t(y, self.y_log) - self.y0) / (self.y1 - self.y0) * (H - TOP - BOTTOM)

    def _axis_ticks(self, lo: float, hi: float, base: int) -> list[float]:
        if base:
            return [float(base**e) for e in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)]
        return _ticks(lo, hi)

    def axes(self, title: str, xlabel: str, ylabel: str, x_ticks: bool = True, y_ticks: bool = True) -> list[str]:
        out = [
            f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
            'fill="none" stroke="#444"/>',
            f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
            f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 10}" text-anchor="middle">{html.escape(xlabel)}</text>',
            f'<text x="16" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" '
            f'transform="rotate(-90 16 {(TOP + H - BOTTOM) / 2})">{html.escape(ylabel)}</text>',
        ]
        for v in self._axis_ticks(self.y0, self.y1, self.y_log) if y_ticks else []:
            y = self.py(v)
            out.append(
                f'<line x1="{LEFT - 4}" x2="{LEFT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#444"/>'
                f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(v)}</text>'
            )
        if x_ticks:
            for v in self._axis_ticks(self.x0, self.x1, self.x_log):
                x = self.px(v)
                out.append(
                    f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{H - BOTTOM}" y2="{H - BOTTOM + 4}" stroke="#444"/>'
                    f'<text x="{x:.1f}" y="{H - BOTTOM + 17}" text-anchor="middle">{_fmt(v)}</text>'
                )
        return out


def _svg(parts: Sequence[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif" font-size="11">'
        f'<rect width="{W}" height="{H}" fill="white"/>' + "".join(parts) + "</svg>\n"
    )


def line_chart(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    x_log: int = 0,
    hline: tuple[str, float] | None = None,
    mark: tuple[str, float, float] | None = None,
) -> str:
    """Lines with markers, one per ``(label, xs, ys)``, a legend, an optional labelled level and
    an optional marked point ``(label, x, y)`` (the setting chosen), ringed and named in the legend."""
    xs = [x for _, s, _ in series for x in s]
    ys = [y for _, _, s in series for y in s] + ([hline[1]] if hline else [])
    lo, hi = min(ys), max(ys)
    pad = 0.05 * (hi - lo or 1)
    frame = _Frame((min(xs), max(xs)), (lo - pad, hi + pad), x_log=x_log)
    out = frame.axes(title, xlabel, ylabel)
    legend = list(series) + ([(hline[0], [], [])] if hline else [])
    if hline:
        y = frame.py(hline[1])
        out.append(
            f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="grey" stroke-dasharray="6 4"/>'
        )
    for i, (_, sx, sy) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in zip(sx, sy, strict=True))
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [
            f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="3" fill="{colour}"/>'
            for x, y in zip(sx, sy, strict=True)
        ]
    if mark is not None:
        out.append(
            f'<circle cx="{frame.px(mark[1]):.1f}" cy="{frame.py(mark[2]):.1f}" r="8" fill="none" '
            'stroke="black" stroke-width="2"/>'
        )
    rows = len(legend) + (mark is not None)
    for i, (label, _, _) in enumerate(legend):
        y = H - BOTTOM - 12 - 16 * (rows - 1 - i)
        colour = "grey" if hline and i == len(legend) - 1 else COLOURS[i % len(COLOURS)]
        sample = (
            f'<line x1="{W - RIGHT - 130}" x2="{W - RIGHT - 110}" y1="{y - 4}" y2="{y - 4}" stroke="{colour}" '
            'stroke-width="2"' + (' stroke-dasharray="6 4"/>' if colour == "grey" else "/>")
        )
        if colour != "grey":  # the point marker too: a series of one point draws no line
            sample += f'<circle cx="{W - RIGHT - 120}" cy="{y - 4}" r="3" fill="{colour}"/>'
        out.append(sample + f'<text x="{W - RIGHT - 104}" y="{y}">{html.escape(label)}</text>')
    if mark is not None:
        y = H - BOTTOM - 12
        out.append(
            f'<circle cx="{W - RIGHT - 120}" cy="{y - 4}" r="6" fill="none" stroke="black" stroke-width="2"/>'
            f'<text x="{W - RIGHT - 104}" y="{y}">{html.escape(mark[0])}</text>'
        )
    return _svg(out)


def histogram(
    values: np.ndarray, bins: int, value_range: tuple[float, float], *, title: str, xlabel: str, ylabel: str
) -> str:
    """Counts of ``values`` in ``bins`` equal bins over ``value_range``."""
    counts, edges = np.histogram(values, bins=bins, range=value_range)
    frame = _Frame((float(edges[0]), float(edges[-1])), (0.0, float(max(counts.max(), 1)) * 1.05))
    out = frame.axes(title, xlabel, ylabel)
    for c, a, b in zip(counts.tolist(), edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        if c:
            x0, x1, y = frame.px(a), frame.px(b), frame.py(c)
            out.append(
                f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 0.5, 0.5):.1f}" '
                f'height="{H - BOTTOM - y:.1f}" fill="{COLOURS[0]}"/>'
            )
    return _svg(out)


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    horizontal: bool = False,
    y_log: bool = False,
) -> str:
    """One bar per label: horizontal bars (labels down the side), or vertical ones (log counts allowed)."""
    n = max(1, len(labels))
    top = max([*values, 1e-9])
    if horizontal:
        frame = _Frame((0.0, top * 1.05), (0.0, 1.0))
        out = frame.axes(title, xlabel, ylabel, y_ticks=False)  # the labels stand beside the bars
        band = (H - TOP - BOTTOM) / n
        for i, (label, v) in enumerate(zip(labels, values, strict=True)):
            y = TOP + i * band
            out.append(
                f'<rect x="{LEFT}" y="{y + 0.15 * band:.1f}" width="{frame.px(v) - LEFT:.1f}" '
                f'height="{0.7 * band:.1f}" fill="{COLOURS[0]}"/>'
                f'<text x="{LEFT - 6}" y="{y + band / 2 + 4:.1f}" text-anchor="end">{html.escape(label)}</text>'
                f'<text x="{frame.px(v) + 4:.1f}" y="{y + band / 2 + 4:.1f}">{_fmt(v)}</text>'
            )
        return _svg(out)
    low = min([v for v in values if v > 0] or [1.0])
    frame = _Frame((0.0, 1.0), (low / 2 if y_log else 0.0, top * (2 if y_log else 1.05)), y_log=10 if y_log else 0)
    out = frame.axes(title, xlabel, ylabel, x_ticks=False)
    band = (W - LEFT - RIGHT) / n
    step = max(1, math.ceil(n / 20))  # at most ~20 labels under the bars
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        x = LEFT + i * band
        if v > 0:
            y = frame.py(v)
            out.append(
                f'<rect x="{x + 0.1 * band:.1f}" y="{y:.1f}" width="{0.8 * band:.1f}" '
                f'height="{H - BOTTOM - y:.1f}" fill="{COLOURS[0]}"/>'
            )
        if i % step == 0:
            out.append(
                f'<text x="{x + band / 2:.1f}" y="{H - BOTTOM + 15}" text-anchor="middle">{html.escape(label)}</text>'
            )
    return _svg(out)
