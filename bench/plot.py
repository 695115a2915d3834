"""A small line-chart writer producing a standalone SVG (no plotting library needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import escape

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
W, H, LEFT, RIGHT, TOP, BOTTOM = 760, 440, 80, 200, 40, 56


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    """Tick values covering [lo, hi]: decades (plus 2 and 5 when few) on a log axis, else 1/2/5
    steps giving about six ticks."""
    if log:
        d0, d1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        mults = (1, 2, 5) if d1 - d0 <= 2 else (1,)
        ts = [m * 10.0**d for d in range(d0, d1 + 1) for m in mults]
        return [t for t in ts if lo <= t * (1 + 1e-9) and t <= hi * (1 + 1e-9)] or [lo, hi]
    raw = (hi - lo) / 6 or 1.0
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(v: float) -> str:
    return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.0e}"


def write_svg(
    path: str | Path,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = True,
    logy: bool = True,
) -> Path:
    """Write one polyline per series (points sorted by x) with axes, ticks, labels and a legend.
    Points that a log axis cannot show (<= 0) or that are not finite are dropped."""
    ok = lambda v, log: math.isfinite(v) and (v > 0 or not log)  # noqa: E731
    data = {
        k: sorted((x, y) for x, y in pts if ok(x, logx) and ok(y, logy))
        for k, pts in series.items()
    }
    xs = [x for pts in data.values() for x, _ in pts] or [1.0]
    ys = [y for pts in data.values() for _, y in pts] or [1.0]
    (x0, x1), (y0, y1) = (min(xs), max(xs)), (min(ys), max(ys))
    if logy:
        y0, y1 = y0 / 1.3, y1 * 1.3
    else:
        y0, y1 = min(0.0, y0), y1 * 1.05 or 1.0
    if x0 == x1:
        x0, x1 = (x0 / 2, x1 * 2) if logx else (x0 - 1, x1 + 1)
    tx = (lambda v: math.log10(v)) if logx else float
    ty = (lambda v: math.log10(v)) if logy else float
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + pw * (tx(x) - tx(x0)) / (tx(x1) - tx(x0))

    def py(y: float) -> float:
        return TOP + ph * (1 - (ty(y) - ty(y0)) / (ty(y1) - ty(y0)))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{LEFT + pw / 2}" y="22" text-anchor="middle" font-size="14">'
        f"{escape(title)}</text>",
    ]
    for t in _ticks(x0, x1, logx):
        out.append(
            f'<line x1="{px(t):.1f}" y1="{TOP}" x2="{px(t):.1f}" y2="{TOP + ph}" stroke="#ddd"/>'
        )
        out.append(
            f'<text x="{px(t):.1f}" y="{TOP + ph + 16}" text-anchor="middle">{_label(t)}</text>'
        )
    for t in _ticks(y0, y1, logy):
        out.append(
            f'<line x1="{LEFT}" y1="{py(t):.1f}" x2="{LEFT + pw}" y2="{py(t):.1f}" stroke="#ddd"/>'
        )
        out.append(f'<text x="{LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>')
    out.append(
        f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>'
    )
    out.append(
        f'<text x="{LEFT + pw / 2}" y="{H - 14}" text-anchor="middle">'
        f"{escape(xlabel)}{' (log)' if logx else ''}</text>"
    )
    out.append(
        f'<text transform="translate(18,{TOP + ph / 2}) rotate(-90)" '
        f'text-anchor="middle">{escape(ylabel)}{" (log)" if logy else ""}</text>'
    )
    for i, (name, pts) in enumerate(data.items()):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(
            f'<polyline points="{coords}" fill="none" stroke="{color}" '
            f'stroke-width="2"><title>{escape(name)}</title></polyline>'
        )
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in pts]
        ly = TOP + 10 + 18 * i
        out.append(
            f'<line x1="{W - RIGHT + 14}" y1="{ly}" x2="{W - RIGHT + 38}" y2="{ly}" '
            f'stroke="{color}" stroke-width="2"/>'
        )
        out.append(f'<text x="{W - RIGHT + 44}" y="{ly + 4}">{escape(name)}</text>')
    out.append("</svg>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path
