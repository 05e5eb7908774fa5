"""Figures for the book: plotly for the website, ipywidgets in a live notebook.

Every interactive figure has two forms drawn by the same function `draw(**values) -> go.Figure`:
- its static twin, `slider_figure`: every value precomputed into one plotly figure whose slider
  switches between them; it stays interactive on the static website, with no kernel;
- its live form, `live`: ipywidgets controls that call `draw` again, in Jupyter or Colab.
`explore` shows both, so a chapter writes one cell and works everywhere.
"""

import inspect
import itertools
import textwrap
from typing import Callable, Sequence

import plotly.graph_objects as go

TEMPLATE = "plotly_white"


def show_source(obj) -> None:
    """Display lectlib's source of a function, class or method as a highlighted code block.

    A fenced Python block in Markdown: Jupyter, Colab and the website highlight it, and the
    website wraps long lines instead of scrolling them. It displays at once, so several calls in
    one cell all show.
    """
    from IPython.display import Markdown, display

    display(Markdown(f"```python\n{textwrap.dedent(inspect.getsource(obj)).rstrip()}\n```"))


def slider_figure(draw: Callable[..., go.Figure], controls: dict[str, Sequence], *,
                  title: str = "", height: int = 450) -> go.Figure:
    """One figure holding `draw(**values)` for every combination of `controls`, and its controls.

    All traces of all frames are added at once and the controls toggle which are visible, so the
    figure needs no kernel. One control is a slider; with two, the first is a dropdown that
    installs the slider of the second for its value; with more, one slider runs over all
    combinations.
    """
    if not controls:
        raise ValueError("controls must name at least one parameter and its values")
    names = list(controls)
    combos = list(itertools.product(*(controls[n] for n in names)))
    fig = go.Figure()
    owner: list[int] = []
    titles = []
    for index, combo in enumerate(combos):
        frame = draw(**dict(zip(names, combo)))
        for trace in frame.data:
            trace.visible = index == 0
            fig.add_trace(trace)
            owner.append(index)
        if index == 0:
            fig.update_layout(frame.layout)
        titles.append(frame.layout.title.text or title)

    def step(index: int, label) -> dict:
        return dict(method="update", label=str(label),
                    args=[{"visible": [o == index for o in owner]}, {"title.text": titles[index]}])

    def slider(indices: list[int], labels: list, prefix: str) -> dict:
        return dict(active=0, currentvalue=dict(prefix=prefix), pad=dict(t=40),
                    steps=[step(i, label) for i, label in zip(indices, labels)])

    fig.update_layout(template=TEMPLATE, height=height, title=titles[0])
    if len(names) == 2:
        first, second = (list(controls[n]) for n in names)
        sliders = {a: slider([i * len(second) + j for j in range(len(second))], second, f"{names[1]}: ")
                   for i, a in enumerate(first)}
        buttons = [dict(method="update", label=str(a),
                        args=[{"visible": [o == i * len(second) for o in owner]},
                              {"sliders": [sliders[a]], "title.text": titles[i * len(second)]}])
                   for i, a in enumerate(first)]
        fig.update_layout(sliders=[sliders[first[0]]],
                          updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right",
                                            y=1.18, yanchor="top", showactive=True)])
    else:
        labels = [", ".join(map(str, c)) if len(names) > 1 else c[0] for c in combos]
        fig.update_layout(sliders=[slider(list(range(len(combos))), labels, ", ".join(names) + ": ")])
    return fig


def live(draw: Callable[..., go.Figure], controls: dict[str, Sequence]):
    """ipywidgets controls (a slider or dropdown per parameter) that redraw `draw` live."""
    import ipywidgets as widgets
    from IPython.display import display

    def control(name: str, values: Sequence):
        values = list(values)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return widgets.SelectionSlider(options=values, value=values[0], description=name,
                                           continuous_update=False, style={"description_width": "initial"})
        return widgets.Dropdown(options=values, value=values[0], description=name)

    boxes = {name: control(name, values) for name, values in controls.items()}
    out = widgets.Output()

    def redraw(**values):
        out.clear_output(wait=True)
        with out:
            display(draw(**values).update_layout(template=TEMPLATE))

    panel = widgets.interactive(redraw, **boxes)
    return widgets.VBox([widgets.HBox(panel.children[:-1]), out])


def explore(draw: Callable[..., go.Figure], controls: dict[str, Sequence], *, title: str = ""):
    """Show the static twin (interactive everywhere, the website included) and the live panel.

    On the website the live panel shows its controls and its first drawing, saved with the page;
    it redraws only where a kernel runs (Jupyter, Colab).
    """
    from IPython.display import display

    display(slider_figure(draw, controls, title=title))
    display(live(draw, controls))


def line_figure(x, ys: dict[str, Sequence], *, title: str = "", x_title: str = "", y_title: str = "",
                log_x: bool = False, log_y: bool = False) -> go.Figure:
    """Several named lines over one x axis."""
    fig = go.Figure([go.Scatter(x=list(x), y=list(y), mode="lines+markers", name=name) for name, y in ys.items()])
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title=x_title, yaxis_title=y_title)
    if log_x:
        fig.update_xaxes(type="log")
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def heatmap_figure(z, *, x, y, title: str = "", x_title: str = "", y_title: str = "",
                   colorscale: str = "Viridis", zmin=None, zmax=None, text_format: str | None = None) -> go.Figure:
    """A heatmap with hover values (and the values printed in the cells when `text_format` is given)."""
    heat = go.Heatmap(z=z, x=list(x), y=list(y), colorscale=colorscale, zmin=zmin, zmax=zmax,
                      texttemplate=text_format, hovertemplate="x=%{x}<br>y=%{y}<br>value=%{z}<extra></extra>")
    fig = go.Figure(heat)
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title=x_title, yaxis_title=y_title)
    return fig
