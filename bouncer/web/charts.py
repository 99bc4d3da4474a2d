"""Line charts drawn by the server as SVG (the template draws what `line_chart` lays out):
no chart library, no build step, nothing fetched by the browser."""
import math
from dataclasses import dataclass, field

WIDTH, HEIGHT = 520, 150
LEFT, RIGHT, TOP, BOTTOM = 44, 8, 10, 22     # room for the axis labels


@dataclass
class Chart:
    title: str
    unit: str
    lines: list = field(default_factory=list)      # {"label", "segments": ["x,y x,y"], "last"}
    y_ticks: list = field(default_factory=list)    # (y, label)
    x_labels: list = field(default_factory=list)   # (x, label, anchor)
    ceiling: tuple | None = None                   # (y, label): a cap drawn dashed
    width: int = WIDTH
    height: int = HEIGHT


def line_chart(title, times, lines, unit="", ceiling=None):
    """A chart of `lines` ({label: [value or None]}, one value per time of `times`), with an
    optional `ceiling` (value, label) such as a cap."""
    values = [v for series in lines.values() for v in series if v is not None]
    top = nice_ceiling(max(values + [ceiling[0] if ceiling else 0, 1]))
    chart = Chart(title, unit)
    x = x_scale(len(times))
    y = y_scale(top)
    for label, series in lines.items():
        chart.lines.append({"label": label, "segments": segments(series, x, y), "last": last_value(series)})
    chart.y_ticks = [(y(v), format_value(v)) for v in (0, top / 2, top)]
    chart.x_labels = [(x(i), clock(times[i]), anchor) for i, anchor in
                      ((0, "start"), (len(times) // 2, "middle"), (len(times) - 1, "end"))] if times else []
    if ceiling:
        chart.ceiling = (y(ceiling[0]), ceiling[1])
    return chart


def x_scale(points):
    span = WIDTH - LEFT - RIGHT
    return lambda i: round(LEFT + (span * i / (points - 1) if points > 1 else span), 1)


def y_scale(top):
    span = HEIGHT - TOP - BOTTOM
    return lambda v: round(HEIGHT - BOTTOM - span * v / top, 1)


def segments(series, x, y):
    """Polyline point lists, broken where a value is missing."""
    found, current = [], []
    for i, value in enumerate(series):
        if value is None:
            if current:
                found.append(" ".join(current))
            current = []
            continue
        current.append("%s,%s" % (x(i), y(value)))
    if current:
        found.append(" ".join(current))
    return found


def last_value(series):
    present = [v for v in series if v is not None]
    return present[-1] if present else None


def nice_ceiling(value):
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `value`."""
    power = 10 ** math.floor(math.log10(value))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= value:
            return factor * power
    return 10 * power


def format_value(value):
    return ("%d" % value) if float(value).is_integer() else ("%.1f" % value)


def clock(iso):
    """'2026-12-01T13:58:00Z' -> '13:58'."""
    return iso[11:16]
