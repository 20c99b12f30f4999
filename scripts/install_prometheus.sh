#!/usr/bin/env bash
# Install Prometheus (Debian's package) for the monitoring integration tests.
# Prints the binary's path. Idempotent: does nothing when prometheus is already present.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_prometheus: need root or sudo to apt-get install prometheus" >&2; exit 1; }
  sudo=sudo
fi
echo "install_prometheus: apt-get install prometheus" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >&2
# --no-install-recommends keeps node-exporter & co out; policy-rc.d stops the service auto-start.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e $policy ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee $policy >/dev/null && $sudo chmod +x $policy && own_policy=1
fi
$sudo apt-get install -y -qq --no-install-recommends prometheus >&2
if [ $own_policy = 1 ]; then $sudo rm -f $policy; fi
command -v prometheus >/dev/null && command -v promtool >/dev/null
