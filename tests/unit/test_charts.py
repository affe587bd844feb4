"""ui.charts: the Load page's per-class chart names its overall line in a legend above the plot (issue 16: the
'overall' label sat on the line, over the bars)."""
from __future__ import annotations

from ui.charts import fig_per_class_accuracy


def test_overall_line_is_named_in_the_legend_not_over_the_bars():
    fig = fig_per_class_accuracy({"cat": 0.9, "dog": 0.85, "ship": float("nan")}, overall=0.8765)
    assert not fig.layout.annotations  # no text drawn inside the plot area
    assert [round(s.y0, 6) for s in fig.layout.shapes] == [87.65]  # the line itself is still there
    named = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in named] == ["overall 87.65 %"] and named[0].line.dash == "dot"
    assert fig.layout.legend.yanchor == "bottom" and fig.layout.legend.y >= 1  # above the plot area
    assert list(fig.data[0].y) == [90.0, 85.0, None]


def test_without_overall_there_is_no_line_and_no_legend_entry():
    fig = fig_per_class_accuracy({"a": 1.0})
    assert not fig.layout.shapes and all(t.showlegend is False for t in fig.data)
