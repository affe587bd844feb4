"""Small plotly figures of the Load page (the analysis and run figures live in core.visualize)."""
from __future__ import annotations

import math

import plotly.graph_objects as go


def fig_class_counts(counts: dict[str, int]) -> go.Figure:
    names = list(counts)
    fig = go.Figure(go.Bar(x=names, y=[counts[n] for n in names], marker_color="#1f77b4",
                           hovertemplate="%{x}: %{y} images<extra></extra>"))
    fig.update_layout(title="Images per class (train + selection + test)", xaxis_title="Class", yaxis_title="Images",
                      height=320, margin={"t": 50, "b": 40})
    fig.update_xaxes(type="category")
    return fig


def fig_per_class_accuracy(per_class: dict[str, float], overall: float | None = None) -> go.Figure:
    names = list(per_class)
    vals = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v * 100 for v in per_class.values()]
    fig = go.Figure(go.Bar(x=names, y=vals, marker_color="#2ca02c", text=[f"{v:.1f}" if v is not None else "" for v in vals],
                           textposition="outside", hovertemplate="%{x}: %{y:.2f} %<extra></extra>", showlegend=False))
    if overall is not None:  # the line's name goes in a legend above the plot: a label on the line overlapped bars
        fig.add_hline(y=overall * 100, line_dash="dot", line_color="#555")
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line={"dash": "dot", "color": "#555"},
                                 name=f"overall {overall * 100:.2f} %"))
    lo = min([v for v in vals if v is not None] or [0])
    fig.update_layout(title="Per-class accuracy (selection images)", xaxis_title="Class", yaxis_title="Accuracy (%)",
                      height=320, margin={"t": 50, "b": 40},
                      legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom"})
    fig.update_yaxes(range=[max(0, lo - 10), 102])
    fig.update_xaxes(type="category")
    return fig


def fig_confusion(confusion: list[list[int]], names: list[str]) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=confusion, x=names, y=names, colorscale="Blues", colorbar={"title": "Images"},
                               hovertemplate="true %{y}, predicted %{x}: %{z} images<extra></extra>"))
    fig.update_layout(title="Confusion matrix (selection images)", xaxis_title="Predicted class", yaxis_title="True class",
                      height=420)
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def to_image(chw_u8) -> "object":
    """A (C, H, W) uint8 tensor as an (H, W[, 3]) array st.image can show."""
    arr = chw_u8.numpy() if hasattr(chw_u8, "numpy") else chw_u8
    return arr[0] if arr.shape[0] == 1 else arr[:3].transpose(1, 2, 0)
