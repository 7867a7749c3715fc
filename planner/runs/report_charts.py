"""Inline SVG charts for the HTML reports: axes scaled to the data, "nice" ticks (1, 2, 2.5, 5 x 10^k) with
as many decimals as the step needs, units on the axes, and a viewBox so a chart fills whatever width the
page gives it. No JavaScript, no external assets: the page is one file a person can mail.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

W, H = 640, 280                       # viewBox; the page scales it to its column width
PAD_L, PAD_R, PAD_T, PAD_B = 64, 16, 16, 44
BLUE, ORANGE, GREY, RED, GREEN = "#2563eb", "#ea580c", "#9ca3af", "#dc2626", "#16a34a"


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (about `target` of them), e.g. 6.1..6.26 -> 6.10, 6.15, ... 6.30."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        span = abs(lo) * 0.1 or 1.0
        lo, hi = lo - span, hi + span
    raw = (hi - lo) / max(1, target - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    start = math.floor(lo / step + 1e-9) * step
    ticks, t = [], start
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
    return ticks if len(ticks) >= 2 else [start, start + step]


def decimals_for(ticks: Sequence[float]) -> int:
    """Decimals that tell neighbouring ticks apart (a step of 0.05 needs 2, of 2.5 needs 1)."""
    if len(ticks) < 2:
        return 0
    step = abs(ticks[1] - ticks[0])
    for d in range(0, 7):
        if abs(round(step, d) - step) < step * 1e-6:
            return d
    return 6


def _fmt(unit: str) -> Callable[[float, int], str]:
    def fmt(v: float, d: int) -> str:
        if unit == "$" and 0 < d < 2:
            d = 2   # money: $0.50, not $0.5
        text = f"{v:,.{d}f}"
        if unit == "$":
            return ("-$" + text[1:]) if text.startswith("-") else "$" + text
        return f"{text}{unit}" if unit in ("%",) else text
    return fmt


def _frame(title: str, x_label: str, y_label: str, body: str, kind: str, points: int) -> str:
    esc = html.escape
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" class="chart" '
            f'data-chart="{esc(kind)}" data-points="{points}" preserveAspectRatio="xMidYMid meet">'
            f"<title>{esc(title)}</title>{body}"
            f'<text x="{PAD_L + (W - PAD_L - PAD_R) / 2}" y="{H - 6}" text-anchor="middle" class="axis-label">'
            f"{esc(x_label)}</text>"
            f'<text x="14" y="{PAD_T + (H - PAD_T - PAD_B) / 2}" text-anchor="middle" class="axis-label" '
            f'transform="rotate(-90 14 {PAD_T + (H - PAD_T - PAD_B) / 2})">{esc(y_label)}</text></svg>')


def _empty(title: str, kind: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H // 2}" role="img" class="chart empty" '
            f'data-chart="{html.escape(kind)}" data-points="0"><title>{html.escape(title)}</title>'
            f'<text x="{W / 2}" y="{H / 4}" text-anchor="middle" class="axis-label">no data recorded</text></svg>')


class _Axes:
    """Linear scales from data to the plot area, and the grid + tick labels that go with them."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], *, x_unit: str, y_unit: str,
                 y_zero: bool, x_ticks: bool = True):
        self.xt = nice_ticks(min(xs), max(xs)) if x_ticks else []
        lo, hi = min(ys), max(ys)
        if y_zero:
            lo, hi = min(0.0, lo), max(0.0, hi)
        else:  # scaled to the data, with a little air, so a real 6.26 -> 6.11 drop is visible
            pad = (hi - lo) * 0.08 or abs(hi) * 0.05 or 1.0
            lo, hi = lo - pad, hi + pad
        self.yt = nice_ticks(lo, hi)
        self.x0, self.x1 = (self.xt[0], self.xt[-1]) if self.xt else (min(xs), max(xs))
        if self.x1 == self.x0:
            self.x1 = self.x0 + 1
        self.y0, self.y1 = self.yt[0], self.yt[-1]
        self.x_unit, self.y_unit = x_unit, y_unit

    def sx(self, x: float) -> float:
        return PAD_L + (x - self.x0) / (self.x1 - self.x0) * (W - PAD_L - PAD_R)

    def sy(self, y: float) -> float:
        return PAD_T + (H - PAD_T - PAD_B) - (y - self.y0) / (self.y1 - self.y0) * (H - PAD_T - PAD_B)

    def grid(self) -> str:
        out = []
        yd, yf = decimals_for(self.yt), _fmt(self.y_unit)
        for t in self.yt:
            y = self.sy(t)
            out.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{W - PAD_R}" y2="{y:.1f}" class="grid"/>'
                       f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{yf(t, yd)}</text>')
        xd, xf = decimals_for(self.xt), _fmt(self.x_unit)
        for t in self.xt:
            x = self.sx(t)
            out.append(f'<line x1="{x:.1f}" y1="{H - PAD_B}" x2="{x:.1f}" y2="{H - PAD_B + 4}" class="axis"/>'
                       f'<text x="{x:.1f}" y="{H - PAD_B + 17}" text-anchor="middle" class="tick">{xf(t, xd)}</text>')
        out.append(f'<line x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - PAD_R}" y2="{H - PAD_B}" class="axis"/>')
        return "".join(out)


def line_chart(series: Sequence[tuple[str, Sequence[tuple[float, float]], str]], *, title: str, x_label: str,
               y_label: str, kind: str, y_unit: str = "", y_zero: bool = False) -> str:
    """Lines (name, [(x, y)], colour); the y axis spans the data (or starts at 0 with `y_zero`)."""
    pts = [p for _, s, _ in series for p in s]
    if not pts:
        return _empty(title, kind)
    ax = _Axes([p[0] for p in pts], [p[1] for p in pts], x_unit="", y_unit=y_unit, y_zero=y_zero)
    body = [ax.grid()]
    for name, s, colour in series:
        if not s:
            continue
        poly = " ".join(f"{ax.sx(x):.1f},{ax.sy(y):.1f}" for x, y in s)
        body.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{poly}" '
                    f'data-series="{html.escape(name)}"/>')
        if len(s) <= 60:
            body.append(f'<g fill="{colour}">' + "".join(
                f'<circle cx="{ax.sx(x):.1f}" cy="{ax.sy(y):.1f}" r="2.5"/>' for x, y in s) + "</g>")
    body.append(_legend([(n, c) for n, s, c in series if s]))
    return _frame(title, x_label, y_label, "".join(body), kind, len(pts))


def bar_chart(labels: Sequence[str], series: Sequence[tuple[str, Sequence[float | None], str]], *, title: str,
              x_label: str, y_label: str, kind: str, y_unit: str = "", signed_colours: bool = False) -> str:
    """Grouped bars: one group per label, one bar per series (None = no bar). With `signed_colours`
    a bar above zero is red (over the estimate) and below green (under)."""
    values = [v for _, vs, _ in series for v in vs if v is not None]
    if not labels or not values:
        return _empty(title, kind)
    ax = _Axes([0.0, float(len(labels))], values, x_unit="", y_unit=y_unit, y_zero=True, x_ticks=False)
    ax.x0, ax.x1 = 0.0, float(len(labels))
    body = [ax.grid()]
    slot = (W - PAD_L - PAD_R) / len(labels)
    bar_w = max(1.5, slot * 0.8 / len(series))
    zero = ax.sy(0.0)
    every = max(1, math.ceil(len(labels) / 16))   # at most ~16 labels along the axis
    for i, label in enumerate(labels):
        for j, (_, vs, colour) in enumerate(series):
            v = vs[i] if i < len(vs) else None
            if v is None:
                continue
            x = PAD_L + i * slot + slot * 0.1 + j * bar_w
            y = ax.sy(v)
            fill = (RED if v > 0 else GREEN) if signed_colours else colour
            body.append(f'<rect x="{x:.1f}" y="{min(y, zero):.1f}" width="{bar_w:.1f}" '
                        f'height="{max(0.5, abs(zero - y)):.1f}" fill="{fill}" class="bar" data-value="{v:.6g}">'
                        f"<title>{html.escape(label)}: {v:,.4g}{html.escape(y_unit)}</title></rect>")
        if i % every == 0:
            body.append(f'<text x="{PAD_L + (i + 0.5) * slot:.1f}" y="{H - PAD_B + 17}" text-anchor="middle" '
                        f'class="tick">{html.escape(label)}</text>')
    body.append(f'<line x1="{PAD_L}" y1="{zero:.1f}" x2="{W - PAD_R}" y2="{zero:.1f}" class="axis"/>')
    if not signed_colours:
        body.append(_legend([(n, c) for n, _, c in series]))
    return _frame(title, x_label, y_label, "".join(body), kind, len(values))


def _legend(items: Sequence[tuple[str, str]]) -> str:
    if len(items) < 2:
        return ""
    out, x = [], PAD_L + 8
    for name, colour in items:
        out.append(f'<rect x="{x}" y="{PAD_T - 2}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 14}" y="{PAD_T + 7}" class="tick">{html.escape(name)}</text>')
        x += 24 + 7 * len(name)
    return "".join(out)
