#!/usr/bin/env bash
# Screenshot a run's report.html in headless Chromium, to check by eye that the page
# reads well (tables fit or scroll, plots show) in a real browser.
#
#   scripts/screenshot_report.sh RUN_DIR OUT.png [WIDTHxHEIGHT]
#
# Needs Debian's chromium (`apt-get install -y chromium`). Every network-touching
# feature is switched off: the report is self-contained, so a page that renders
# correctly here with no network proves it needs none.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "usage: $0 RUN_DIR OUT.png [WIDTHxHEIGHT]" >&2
    exit 2
fi
run_dir=$1
out=$2
size=${3:-1400x2400}
report="$(cd "$run_dir" && pwd)/report.html"
if [[ ! -f $report ]]; then
    echo "$report: no report; run \`netshrink report $run_dir\` first" >&2
    exit 2
fi
browser=${CHROMIUM:-/usr/bin/chromium}
if [[ ! -x $browser ]]; then
    echo "$browser: not found; install it with \`apt-get install -y chromium\` or set CHROMIUM" >&2
    exit 2
fi
out_abs="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT

# A throw-away profile keeps the user's own browser state out of it (and vice versa).
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --window-size="${size/x/,}" \
    --screenshot="$out_abs" "file://$report" 2>/dev/null
test -s "$out_abs"
echo "$out_abs"
