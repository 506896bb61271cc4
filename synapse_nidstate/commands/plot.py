"""`synapse-nidstate stats --plot`: the storage report as a PNG bar chart (matplotlib)."""

from synapse_nidstate.commands.storage_figures import (
    NIDSTATE,
    SYNAPSE,
    StorageReport,
    format_bytes,
)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "plotting needs matplotlib: pip install 'synapse-nidstate[plot]'"
        ) from e


def plot_report(report: StorageReport, path: str) -> None:
    """Write a PNG bar chart: bytes per table on both sides, and the top rooms."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    syn, mod = report.synapse, report.nidstate
    colours = {SYNAPSE: "#d95f02", NIDSTATE: "#1b9e77"}
    fig = Figure(figsize=(11, 13), layout="constrained")
    FigureCanvasAgg(fig)
    ax_tables, ax_entries, ax_bytes = fig.subplots(3, 1)

    # Bytes per table, stacked heap / indexes / TOAST, one colour per side.
    tables = [(side, t) for side in (syn, mod) for t in side.tables if t.exists]
    ys = list(range(len(tables)))
    left = [0.0] * len(tables)
    handles = [Patch(facecolor=colours[side.name], label=side.name) for side in (syn, mod)]
    for field, label, alpha in (
        ("table_bytes", "table", 1.0),
        ("index_bytes", "indexes", 0.55),
        ("toast_bytes", "TOAST", 0.25),
    ):
        widths = [float(getattr(t, field) or 0) for _, t in tables]
        if not any(widths):
            continue
        ax_tables.barh(
            ys,
            widths,
            left=left,
            color=[colours[side.name] for side, _ in tables],
            alpha=alpha,
            edgecolor="black",
            linewidth=0.3,
        )
        handles.append(Patch(facecolor="grey", alpha=alpha, edgecolor="black", label=label))
        left = [a + b for a, b in zip(left, widths)]
    ax_tables.set_yticks(ys, [t.name for _, t in tables])
    ax_tables.invert_yaxis()
    ax_tables.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_bytes(x)))
    ratio = report.total_bytes_ratio
    ax_tables.set_title(
        f"Bytes per table: {SYNAPSE} {format_bytes(syn.total_bytes)}, "
        f"{NIDSTATE} {format_bytes(mod.total_bytes)}"
        + ("" if ratio is None else f" (ratio {ratio:.3f})")
    )
    ax_tables.legend(handles=handles, loc="best")

    # The top rooms of either side, in Synapse's order, then the module's.
    rooms: list[str] = []
    for room in syn.top_rooms + mod.top_rooms:
        if room.room_id not in rooms:
            rooms.append(room.room_id)
    by_side = {side.name: {r.room_id: r for r in side.top_rooms} for side in (syn, mod)}
    height = 0.4
    for ax, field, unit in (
        (ax_entries, "state_entries", "state entries"),
        (ax_bytes, "data_bytes", "stored state data"),
    ):
        for offset, side in ((-height / 2, syn), (height / 2, mod)):
            values = [
                float(getattr(by_side[side.name][r], field)) if r in by_side[side.name] else 0.0
                for r in rooms
            ]
            ax.barh(
                [i + offset for i in range(len(rooms))],
                values,
                height=height,
                color=colours[side.name],
                label=side.name,
            )
        ax.set_yticks(list(range(len(rooms))), rooms, fontsize="small")
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        if field == "data_bytes":
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_bytes(x)))
        missing = any(r not in by_side[side.name] for side in (syn, mod) for r in rooms)
        ax.set_title(
            f"Top rooms: {unit}"
            + (" (no bar: not in that side's top rooms)" if missing else "")
        )
        if rooms:
            ax.legend(loc="best")
    fig.savefig(path, format="png", dpi=100)
