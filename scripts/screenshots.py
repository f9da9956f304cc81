"""Screenshots of the built book for a reviewer: the intro and a per-model page on a 1,400 px
window, the per-model page also in dark mode. ``make screenshots`` (after ``make book``) writes
them to ``screenshots/``.

Usage: python scripts/screenshots.py [--site _build/html] [--out screenshots] [--page PATH ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import chromium  # noqa: E402  (the browser helpers of the test suite)

DEFAULT_PAGES = ("book/intro.html", "book/runs/tiny-moe-fine/obs1_neurons_as_experts.html")
DARK = "document.documentElement.setAttribute('data-theme', 'dark'); true"


def _name(page: str, dark: bool) -> str:
    stem = page.removesuffix(".html").removeprefix("book/").removeprefix("runs/").replace("/", "-")
    return f"{stem}{'-dark' if dark else ''}.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=ROOT / "_build" / "html")
    parser.add_argument("--out", type=Path, default=ROOT / "screenshots")
    parser.add_argument("--page", action="append", help="page to shoot, relative to the site (repeatable)")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"no built site in {args.site}: run make book first", file=sys.stderr)
        return 1
    chosen = args.page or [p for p in DEFAULT_PAGES if (args.site / p).is_file()]
    with (
        tempfile.TemporaryDirectory() as profile,
        chromium.serve(args.site) as url,
        chromium.open_browser(Path(profile)) as browser,
    ):
        chromium.set_window(browser)
        for page in chosen:
            for dark in (False, True) if "/runs/" in page else (False,):
                chromium.open_page(browser, f"{url}/{page}")
                if dark:
                    browser.evaluate(DARK)
                    time.sleep(1.5)  # the charts redraw in the dark theme
                path = chromium.screenshot(browser, args.out / _name(page, dark))
                print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
