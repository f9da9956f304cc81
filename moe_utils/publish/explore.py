"""ipywidgets explorers for JupyterLab: pick a layer, token, matrix or expert and redraw a chart.

In the static book these controls would only show their saved state, so :func:`show` displays
them only in a live kernel; the book's pages rely on the Altair sliders instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .render import book_build_enabled


def explorer(draw: Callable[..., Any], controls: Mapping[str, Sequence[Any]]) -> Any:
    """An ``ipywidgets.interactive`` that calls ``draw(**choice)`` for the chosen control values.

    Integer ranges become sliders, anything else a dropdown.
    """
    import ipywidgets as w

    kwargs = {}
    for name, values in controls.items():
        values = list(values)
        if values and all(isinstance(v, int) for v in values) and values == list(range(values[0], values[-1] + 1)):
            kwargs[name] = w.IntSlider(min=values[0], max=values[-1], value=values[0], description=name)
        else:
            kwargs[name] = w.Dropdown(options=values, value=values[0] if values else None, description=name)
    return w.interactive(draw, **kwargs)


def show(draw: Callable[..., Any], controls: Mapping[str, Sequence[Any]]) -> None:
    """Display an explorer in a live kernel; do nothing during a book build."""
    if book_build_enabled():
        return
    from IPython.display import display

    display(explorer(draw, controls))
