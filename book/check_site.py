"""Open the built website in headless Chromium and check that every page renders.

    python book/check_site.py _build/html [--screenshots DIR]

For each chapter page: the page loads without uncaught script errors; every plotly figure was
drawn (its div holds plotly's SVG); every embedded ipywidgets view was rendered by the widget
manager; math was typeset by the site's own MathJax; nothing is loaded from another host.
Screenshots of each page go to DIR (default _build/screenshots) to look at.
"""

import argparse
import functools
import http.server
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
                  "--hide-scrollbars"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium found: apt-get install chromium")


def run_chromium(url: str, *extra: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
                               "--v=0", "--virtual-time-budget=20000", *extra, url],
                              capture_output=True, text=True, timeout=180)


def check_page(url: str, html_source: str, shot: Path) -> list[str]:
    """Problems found on one page (empty when it renders)."""
    problems = []
    result = run_chromium(url, "--dump-dom")
    dom = result.stdout
    errors = [line for line in result.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    problems += [f"script error: {line.strip()[:300]}" for line in errors]
    figures = html_source.count('class="plotly-graph-div"')
    drawn = len(re.findall(r'class="plotly-graph-div[^"]*js-plotly-plot', dom))
    if drawn < figures:
        problems.append(f"{figures - drawn} of {figures} plotly figures were not drawn")
    views = html_source.count("application/vnd.jupyter.widget-view+json")
    rendered = dom.count("jupyter-widgets widget-")
    if views and rendered == 0:
        problems.append(f"{views} widget views embedded, none rendered")
    if "$" in html_source and "math" in html_source and "mjx-container" not in dom and re.search(r'class="math', html_source):
        problems.append("math was not typeset")
    outside = {m for m in re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?://[^"]+)"', html_source)}
    if outside:
        problems.append(f"loads from other hosts: {sorted(outside)}")
    run_chromium(url, f"--screenshot={shot}", "--window-size=1280,4000")
    print(f"{url}: {figures} plotly figures ({drawn} drawn), {views} widget views ({rendered} rendered widgets)"
          f"{'' if not problems else ' -- PROBLEMS'}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("--screenshots", type=Path, default=Path("_build/screenshots"))
    args = parser.parse_args()
    pages = sorted(args.site.glob("chapters/*/*.html")) + [args.site / "book" / "intro.html"]
    if len(pages) < 2:
        raise SystemExit(f"no chapter pages under {args.site}: build the book first (bash book/build.sh)")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(args.site))
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    args.screenshots.mkdir(parents=True, exist_ok=True)
    failures = {}
    for page in pages:
        rel = page.relative_to(args.site).as_posix()
        url = f"http://127.0.0.1:{server.server_port}/{rel}"
        problems = check_page(url, page.read_text(), args.screenshots / (page.stem + ".png"))
        if problems:
            failures[rel] = problems
    server.shutdown()
    for rel, problems in failures.items():
        print(f"{rel}:\n  " + "\n  ".join(problems), file=sys.stderr)
    if failures:
        raise SystemExit(f"{len(failures)} of {len(pages)} pages did not render")
    print(f"all {len(pages)} pages rendered; screenshots in {args.screenshots}")


if __name__ == "__main__":
    main()
