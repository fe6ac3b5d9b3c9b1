#!/usr/bin/env bash
# What the test suite needs beyond the Python environment: Prometheus and promtool (Debian's
# package). Installed only when missing; needs root (as CI and this machine have) and apt.
set -euo pipefail
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "installing Prometheus (Debian package) for the monitoring tests …"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package enables a system service; the tests start their own Prometheus on free ports.
  (systemctl disable --now prometheus 2>/dev/null || true)
fi
prometheus --version 2>&1 | head -1
