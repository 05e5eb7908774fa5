# Loaded by IPython only during the book build (book/build.sh sets IPYTHONDIR to book/ipython).
# myst-nb drops plotly's own JSON output; this renderer emits plain HTML whose script calls the
# plotly.js that the site serves itself (book/_ext/lectbook.py), so figures stay interactive offline.
import os

import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer


class _BookRenderer(MimetypeRenderer):
    def to_mimebundle(self, fig_dict):
        html = pio.to_html(fig_dict, include_plotlyjs=False, full_html=False, auto_play=False,
                           config={"responsive": True, "displaylogo": False})
        return {"text/html": html}


pio.renderers["book"] = _BookRenderer()
pio.renderers.default = "book"
os.environ["LECTLIB_BOOK"] = "1"
