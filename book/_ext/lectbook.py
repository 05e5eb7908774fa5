"""Sphinx extension of the book: make the pages work offline and without script errors.

- plotly.min.js must run before require.js (loaded by myst-nb for widget pages): with an AMD
  loader present it registers itself as an anonymous module instead of `window.Plotly`, which
  the figures' inline scripts call. A low priority puts it first in the page head.
- The Jupyter widgets HTML manager typesets with MathJax 2's `MathJax.Hub`; the site serves
  MathJax 3, so a shim maps that call onto MathJax 3.
- jupyter-book registers sphinx-thebe's inline set-up script twice, and the second copy throws
  (a `const` declared twice); pages keep one copy of each script.
"""


def _drop_duplicate_scripts(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for script in context.get("script_files", []):
        attributes = dict(getattr(script, "attributes", {}))
        key = (getattr(script, "filename", str(script)) or "", tuple(sorted(attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.add_js_file("_vendor/plotly.min.js", priority=100)
    app.add_js_file("mathjax2-shim.js", priority=501, defer="defer")
    app.add_css_file("book.css")
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
