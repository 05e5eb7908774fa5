"""Sphinx extension of the book: load the vendored plotly.js on every page.

plotly.min.js must run before require.js (loaded by myst-nb for widget pages): with an AMD
loader present it registers itself as an anonymous module instead of `window.Plotly`, which the
figures' inline scripts call. A low priority puts it first in the page head.
"""


def setup(app):
    app.add_js_file("_vendor/plotly.min.js", priority=100)
    app.add_css_file("book.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
