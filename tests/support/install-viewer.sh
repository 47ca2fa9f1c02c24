#!/bin/sh
# Install what the viewer and PACS integration tests need, quietly and idempotently:
#   Debian packages orthanc, orthanc-dicomweb, chromium, and the prebuilt OHIF viewer
#   (npm @ohif/app, its dist/ unpacked under ${D2R_TEST_CACHE:-~/.cache/d2r-test}/ohif).
# Chromium comes from Debian; no browser is downloaded through npm.
set -eu

OHIF_VERSION="${OHIF_VERSION:-3.13.2}"
CACHE="${D2R_TEST_CACHE:-${HOME}/.cache/d2r-test}"
OHIF_DIR="${CACHE}/ohif"
TARBALL="${OHIF_DIR}/ohif-app-${OHIF_VERSION}.tgz"

missing=""
for pkg in orthanc orthanc-dicomweb chromium; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $pkg"
done
# npm may come with a nodejs build from elsewhere; only install Debian's when there is none.
command -v npm >/dev/null 2>&1 || missing="$missing npm"
if [ -n "$missing" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# The Debian package starts a system Orthanc on the default ports; the tests run their own.

mkdir -p "$OHIF_DIR"
if [ ! -s "$TARBALL" ]; then
    (cd "$OHIF_DIR" && npm pack "@ohif/app@${OHIF_VERSION}" --silent >/dev/null)
fi
if [ ! -f "${OHIF_DIR}/package/dist/index.html" ] \
        || [ "$TARBALL" -nt "${OHIF_DIR}/package/dist/index.html" ]; then
    rm -rf "${OHIF_DIR}/package"
    tar -xzf "$TARBALL" -C "$OHIF_DIR" package/dist
    touch "${OHIF_DIR}/package/dist/index.html"
fi
