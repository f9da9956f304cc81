#!/usr/bin/env bash
# Copy the JavaScript that the static book serves itself (so that it works offline) from
# node_modules (filled by `npm ci` from package-lock.json) into book/_extra/vendor/:
#   mathjax/tex-mml-chtml.js    MathJax 3 with the components it loads on demand
# No page shows a saved widget, so no widget manager or require.js is shipped.
# Jupyter Book copies book/_extra/ to the site root (html_extra_path in _config.yml).
set -euo pipefail
cd "$(dirname "$0")/.."
nm=node_modules
dest=book/_extra/vendor
for f in "$nm/mathjax/es5/tex-mml-chtml.js"; do
  [ -f "$f" ] || { echo "vendor.sh: $f is missing; run 'npm ci' first" >&2; exit 1; }
done
tmp="$dest.tmp"
rm -rf "$tmp"
mkdir -p "$tmp/mathjax"
# MathJax: the combined tex-mml-chtml component plus the folders it loads from; the other
# combined components (svg output, speech, node) are not used by the book.
cp -r "$nm/mathjax/es5/." "$tmp/mathjax/"
find "$tmp/mathjax" -maxdepth 1 -type f -name '*.js' \
  ! -name tex-mml-chtml.js ! -name core.js ! -name loader.js ! -name startup.js -delete
cp "$nm/mathjax/LICENSE" "$tmp/mathjax/" 2>/dev/null || true
rm -rf "$dest"
mv "$tmp" "$dest"
echo "vendor.sh: wrote $(du -sh "$dest" | cut -f1) to $dest"
