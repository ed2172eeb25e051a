#!/usr/bin/env bash
# Render a run's report and screenshot report.html in headless Chromium, to check by eye
# that the page reads well in a real browser (tables fit or scroll, plots show).
#
#   scripts/screenshot_report.sh RUN_DIR [OUT.png] [WIDTHxHEIGHT]
#
# OUT.png defaults to RUN_DIR/report.png, the window to 1400x3000 (the screenshot is of
# the window: the top of a long report). Needs Debian's chromium
# (`apt-get install -y chromium`; another binary via CHROMIUM=...) and netshrink (the
# repo's .venv/bin/netshrink, `netshrink` on PATH, or NETSHRINK=...). Every
# network-touching browser feature is off: the report is self-contained, so a page that
# renders here with no network needs none. tests/test_report_browser.py runs this.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 3 ]]; then
    echo "usage: $0 RUN_DIR [OUT.png] [WIDTHxHEIGHT]" >&2
    exit 2
fi
run_dir=$1
out=${2:-$run_dir/report.png}
size=${3:-1400x3000}
repo=$(cd "$(dirname "$0")/.." && pwd)

netshrink=${NETSHRINK:-$repo/.venv/bin/netshrink}
if [[ ! -x $netshrink ]]; then
    netshrink=$(command -v netshrink) || {
        echo "netshrink not found: run scripts/setup.sh or set NETSHRINK" >&2
        exit 2
    }
fi
browser=${CHROMIUM:-/usr/bin/chromium}
if [[ ! -x $browser ]]; then
    echo "$browser: not found; install it with \`apt-get install -y chromium\` or set CHROMIUM" >&2
    exit 2
fi

"$netshrink" report "$run_dir" >/dev/null
report="$(cd "$run_dir" && pwd)/report.html"
out_abs="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
rm -f "$out_abs"  # so an old screenshot is never taken for this one
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT

# A throw-away profile keeps the user's own browser state out of it (and vice versa);
# the timeout keeps a browser that hangs (no display, no dbus) from hanging the caller.
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" --window-size="${size/x/,}" \
    --screenshot="$out_abs" "file://$report" >/dev/null 2>&1
test -s "$out_abs"
echo "$out_abs"
