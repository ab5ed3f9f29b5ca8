#!/usr/bin/env bash
# Re-fetches the dashboard's vendored browser libraries from the npm registry
# (npm pack: the published tarball, nothing run), copies their minified
# bundles and licences here and records versions and SHA-256 in VERSIONS.
# Usage: gw/dashboard/vendor/fetch.sh [MQTT_VERSION [UPLOT_VERSION]]
# Then review the diff, run the dashboard's browser tests and commit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mqtt_version=${1:-5.16.0}
uplot_version=${2:-1.6.32}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
npm pack --silent "mqtt@$mqtt_version" "uplot@$uplot_version" >/dev/null
mkdir mqtt uplot
tar xzf "mqtt-$mqtt_version.tgz" -C mqtt --strip-components=1
tar xzf "uplot-$uplot_version.tgz" -C uplot --strip-components=1
cp mqtt/dist/mqtt.min.js "$here/mqtt.min.js"
cp mqtt/LICENSE.md "$here/LICENSE-mqtt.txt"
cp uplot/dist/uPlot.iife.min.js "$here/uPlot.iife.min.js"
cp uplot/dist/uPlot.min.css "$here/uPlot.min.css"
cp uplot/LICENSE "$here/LICENSE-uplot.txt"
{
    echo "# package version file sha256 (written by fetch.sh from npm pack; do not edit)"
    for f in mqtt.min.js LICENSE-mqtt.txt; do
        echo "mqtt $mqtt_version $f $(sha256sum "$here/$f" | cut -d' ' -f1)"
    done
    for f in uPlot.iife.min.js uPlot.min.css LICENSE-uplot.txt; do
        echo "uplot $uplot_version $f $(sha256sum "$here/$f" | cut -d' ' -f1)"
    done
    echo "# tarballs: mqtt-$mqtt_version.tgz $(sha256sum "mqtt-$mqtt_version.tgz" | cut -d' ' -f1)"
    echo "# tarballs: uplot-$uplot_version.tgz $(sha256sum "uplot-$uplot_version.tgz" | cut -d' ' -f1)"
} > "$here/VERSIONS"
cat "$here/VERSIONS"
