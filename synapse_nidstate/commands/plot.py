"""`synapse-nidstate stats --plot`: the storage report as a PNG bar chart (matplotlib).

Three panels: bytes on disk per table (both sides, stacked table / indexes /
TOAST, a linear axis with ticks at round multiples of KiB, MiB, ...), then the
top rooms, one row a room with both sides' bars, for stored state entries and
stored state data (log axes, so that small rooms' bars show; every bar has its
value written at its end).
"""

import contextlib
import math
import os
from collections.abc import Callable
from typing import Any

from synapse_nidstate.commands.storage_figures import (
    NIDSTATE,
    SYNAPSE,
    RoomStats,
    StorageReport,
    format_bytes,
)

_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_COLOURS = {SYNAPSE: "#d95f02", NIDSTATE: "#1b9e77"}


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "plotting needs matplotlib: pip install 'synapse-nidstate[plot]'"
        ) from e


def plot_target_problem(path: str) -> str | None:
    """Why ``path`` cannot take the PNG, or None if it can.

    Tried for real (opened for appending, and removed again if this created
    it), so that read-only file systems and the like are found too.
    """
    if not path:
        return "no file name"
    if os.path.isdir(path):
        return "it is a directory"
    if not path.lower().endswith(".png"):
        return "the chart is a PNG image: name the file FILE.png"
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        if os.path.lexists(parent) and not os.path.isdir(parent):
            return f"{parent} is not a directory"
        return f"no such directory: {parent}"
    existed = os.path.lexists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    if not existed:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return None


def binary_step(largest: float, ticks: int = 6) -> tuple[float, float, str]:
    """(tick step in bytes, unit in bytes, unit name) for a linear axis up to ``largest``.

    The unit is the power of 1024 that ``largest`` is at least one of, the step
    1, 2 or 5 times a power of ten of that unit: 200 KiB, 0.5 MiB, 2 GiB.
    """
    unit, i = 1.0, 0
    while largest >= 1024 * unit and i < len(_BINARY_UNITS) - 1:
        unit *= 1024
        i += 1
    scaled = max(largest / unit, 1e-9)
    rough = scaled / ticks
    power = 10.0 ** math.floor(math.log10(rough))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= rough)
    if i == 0:
        step = max(step, 1.0)
    return step * unit, unit, _BINARY_UNITS[i]


def bytes_label(x: float) -> str:
    """A tick label: ``2048`` -> ``"2 KiB"``, ``1536`` -> ``"1.5 KiB"``, ``0`` -> ``"0"``."""
    if x <= 0:
        return "0"
    for unit in _BINARY_UNITS:
        if x < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{x:.4g} {unit}"
        x /= 1024
    raise AssertionError("unreachable")


def _log_ticks(values: list[float], base: int, strides: tuple[int, ...]) -> list[float]:
    """Powers of ``base`` around ``values`` (all > 0), at most 8 of them, every
    ``stride``-th power for the smallest ``stride`` that allows it."""
    low = math.floor(math.log(min(values), base))
    high = math.ceil(math.log(max(values), base)) + 1
    if base == 10 and high - low <= 3:  # few decades: 1, 2 and 5 times each
        return [m * 10.0**n for n in range(low, high + 1) for m in (1, 2, 5)]
    stride = next((s for s in strides if (high - low) / s <= 8), strides[-1])
    first = low - low % stride
    return [float(base) ** n for n in range(first, high + 1, stride)]


def _count_label(x: float) -> str:
    return f"{x:,.0f}"


def _room_label(room: RoomStats) -> str:
    label = room.name or room.canonical_alias
    if not label:
        return room.room_id
    if len(label) > 40:
        label = label[:39] + "\u2026"
    return f"{label}\n{room.room_id}"


def _tables_panel(ax: Any, report: StorageReport) -> None:
    """Bytes per table, stacked heap / indexes / TOAST, one colour per side."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    syn, mod = report.synapse, report.nidstate
    tables = [(side, t) for side in (syn, mod) for t in side.tables if t.exists]
    ys = list(range(len(tables)))
    left = [0.0] * len(tables)
    handles = [Patch(facecolor=_COLOURS[side.name], label=side.name) for side in (syn, mod)]
    for field, label, alpha in (
        ("table_bytes", "table", 1.0),
        ("index_bytes", "indexes", 0.55),
        ("toast_bytes", "TOAST", 0.25),
    ):
        widths = [float(getattr(t, field) or 0) for _, t in tables]
        if not any(widths):
            continue
        ax.barh(
            ys,
            widths,
            left=left,
            color=[_COLOURS[side.name] for side, _ in tables],
            alpha=alpha,
            edgecolor="black",
            linewidth=0.3,
        )
        handles.append(Patch(facecolor="grey", alpha=alpha, edgecolor="black", label=label))
        left = [a + b for a, b in zip(left, widths)]
    largest = max(left, default=0.0)
    for y, (_, t), end in zip(ys, tables, left):
        text = format_bytes(t.total_bytes) if t.total_bytes is not None else "n/a"
        ax.text(end + largest * 0.01, y, f" {text}", va="center", fontsize="small")
    ax.set_yticks(ys, [t.name for _, t in tables])
    ax.invert_yaxis()
    if largest > 0:
        step, _, _ = binary_step(largest)
        ax.xaxis.set_major_locator(MultipleLocator(step))
        ax.set_xlim(0, largest * 1.15)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: bytes_label(x)))
    ax.set_xlabel("bytes on disk (stacked: table, indexes, TOAST; the total written at the end)")
    ratio = report.total_bytes_ratio
    ax.set_title(
        f"Bytes per table: {SYNAPSE} {format_bytes(syn.total_bytes)}, "
        f"{NIDSTATE} {format_bytes(mod.total_bytes)}"
        + ("" if ratio is None else f" (ratio {ratio:.3f})")
    )
    ax.legend(handles=handles, loc="best", fontsize="small")


def _rooms_panel(ax: Any, report: StorageReport, what: str) -> None:
    """The top rooms, both sides on each room's row: ``what`` is "entries" or "data"."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    rooms = report.top_rooms
    height = 0.38
    label: Callable[[float], str]
    value_label: Callable[[float], str]
    strides: tuple[int, ...]
    if what == "entries":
        sides: list[tuple[str, list[int | None]]] = [
            (f"{SYNAPSE}: rows of state_groups_state", [r.synapse_rows for r in rooms]),
            (f"{NIDSTATE}: entries of nidstate_blocks", [r.nidstate_entries for r in rooms]),
        ]
        label = value_label = _count_label
        base, strides = 10, (1, 2, 3)
        xlabel = "stored state entries (log scale; full states and deltas as stored)"
    else:
        sides = [
            (f"{SYNAPSE}: state_groups_state values", [r.synapse_data_bytes for r in rooms]),
            (f"{NIDSTATE}: packed block entries", [r.nidstate_data_bytes for r in rooms]),
        ]
        label, value_label = bytes_label, format_bytes
        base, strides = 2, (1, 2, 5, 10)
        xlabel = "bytes of stored state data (log scale; no row headers, indexes or strings)"
    ax.set_xscale("log", base=base)
    positive = [float(v) for _, values in sides for v in values if v]
    for (name, values), colour, offset in zip(
        sides, _COLOURS.values(), (-height / 2, height / 2)
    ):
        ys = [i + offset for i in range(len(rooms))]
        drawn = [(y, float(v)) for y, v in zip(ys, values) if v]
        ax.barh(
            [y for y, _ in drawn], [v for _, v in drawn], height=height,
            color=colour, label=name,
        )
        for y, value in zip(ys, values):
            text = "none" if not value else value_label(float(value))
            x = float(value) if value else (min(positive) if positive else 1.0)
            ax.text(x * 1.04, y, f" {text}", va="center", fontsize="x-small")
    if positive:
        ticks = _log_ticks(positive, base, strides)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        left, right = min(ticks[0], min(positive) / 2), max(positive)
        # Room on the right for the value labels and the legend.
        ax.set_xlim(left, right * (right / left) ** 0.3)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: label(x)))
    ax.set_yticks(list(range(len(rooms))), [_room_label(r) for r in rooms], fontsize="small")
    ax.set_ylim(len(rooms) - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    ax.set_title(
        f"Top {len(rooms)} rooms by {SYNAPSE}'s state rows: stored state {what}"
    )
    ax.legend(loc="best", fontsize="small")


def draw_report(report: StorageReport) -> Any:
    """The chart as a matplotlib ``Figure`` (Agg canvas): bytes per table on both
    sides, then, if the report has top rooms, their state entries and data."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_tables = sum(t.exists for side in (report.synapse, report.nidstate) for t in side.tables)
    n_rooms = len(report.top_rooms)
    heights = [1.5 + 0.32 * n_tables]
    if n_rooms:
        heights += [1.6 + 0.62 * n_rooms] * 2
    fig = Figure(figsize=(12, sum(heights) + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(heights), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)
    _tables_panel(axes[0][0], report)
    if n_rooms:
        _rooms_panel(axes[1][0], report, "entries")
        _rooms_panel(axes[2][0], report, "data")
    return fig


def plot_report(report: StorageReport, path: str) -> None:
    """Write the chart (:func:`draw_report`) to ``path`` as a PNG."""
    draw_report(report).savefig(path, format="png", dpi=100)
