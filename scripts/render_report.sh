#!/usr/bin/env bash
# Render a batchmask evaluation report (index.html) to a PNG screenshot with headless Chromium.
#
#   scripts/render_report.sh REPORT_DIR [OUT.png]     (default OUT: REPORT_DIR/screenshot.png)
#   scripts/render_report.sh --which                  prints the browser it would use (exit 1: none)
#
# Needs Debian's `chromium` (apt-get install -y chromium) or set CHROMIUM=/path/to/chrome.
# The report is self-contained, so networking is disabled and nothing is fetched.
set -euo pipefail

find_browser() {
  local b=${CHROMIUM:-}
  if [[ -z "$b" ]]; then
    for c in chromium chromium-browser google-chrome; do
      if command -v "$c" >/dev/null 2>&1; then b=$c; break; fi
    done
  fi
  [[ -n "$b" ]] && command -v "$b"
}

if [[ "${1:-}" == "--which" ]]; then
  find_browser || { echo "error: no chromium found (apt-get install -y chromium, or set CHROMIUM=)" >&2; exit 1; }
  exit 0
fi

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 REPORT_DIR [OUT.png]" >&2
  exit 2
fi
report_dir=$(cd "$1" && pwd)
html="$report_dir/index.html"
out=${2:-$report_dir/screenshot.png}
[[ -f "$html" ]] || { echo "error: $html does not exist (run: batchmask evaluate --report DIR)" >&2; exit 1; }
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")

browser=$(find_browser) || { echo "error: no chromium found (apt-get install -y chromium, or set CHROMIUM=)" >&2; exit 1; }

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars \
  --screenshot="$out" --window-size="${WINDOW_SIZE:-1280,2400}" "file://$html" >/dev/null 2>&1
[[ -s "$out" ]] || { echo "error: chromium wrote no screenshot" >&2; exit 1; }
echo "$out"
