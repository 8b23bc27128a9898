#!/usr/bin/env bash
# Install what the dashboard's browser tests drive (tests/test_dashboard_browser.py):
# Debian's chromium and chromium-driver, from the distribution's own packages,
# so the browser and its driver are always the same release and nothing is
# downloaded behind apt's back (Selenium Manager is never used: the tests name
# /usr/bin/chromedriver themselves). Run as root; exits 0 when both are there.
#
#   sudo bootstrap/browser-tools.sh
set -euo pipefail

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
  echo "browser-tools: chromium and chromedriver already installed ($(/usr/bin/chromium --version 2>/dev/null || echo '?'))"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "browser-tools: chromium/chromedriver are missing and installing them needs root: run 'sudo $0'" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "browser-tools: no apt-get here: install chromium and its chromedriver as /usr/bin/chromium and /usr/bin/chromedriver by hand" >&2
  exit 1
fi
echo "browser-tools: installing Debian's chromium and chromium-driver (apt-get)"
if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }; then
  echo "browser-tools: apt-get could not install chromium chromium-driver (see above): check the package sources and network" >&2
  exit 1
fi
if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
  echo "browser-tools: installed, but /usr/bin/chromium or /usr/bin/chromedriver is still missing" >&2
  exit 1
fi
echo "browser-tools: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium) and $(/usr/bin/chromedriver --version | head -1)"
