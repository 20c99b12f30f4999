#!/usr/bin/env bash
# Install the two npm packages the Node.js client of docs/SERVER.md needs
# (@grpc/grpc-js, @grpc/proto-loader, versions pinned in scripts/node_client/package.json)
# into .tools/node-client/ (git-ignored), for tests/test_node_client.py.
# Idempotent: does nothing when they are installed at the pinned versions.
# Installs node and npm with apt-get when they are missing (root or sudo); needs the npm registry.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.tools/node-client
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_node_client: node and npm are needed: apt-get install nodejs npm (as root)" >&2; exit 1; }
    sudo=sudo
  fi
  echo "install_node_client: apt-get install nodejs npm" >&2
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >&2
  $sudo apt-get install -y -qq --no-install-recommends nodejs npm >&2
fi
mkdir -p "$dest"
if cmp -s scripts/node_client/package.json "$dest/package.json" && [ -d "$dest/node_modules/@grpc/proto-loader" ]; then
  exit 0
fi
cp scripts/node_client/package.json "$dest/package.json"
echo "install_node_client: npm install @grpc/grpc-js @grpc/proto-loader into $dest" >&2
(cd "$dest" && npm install --no-audit --no-fund --loglevel=error >&2)
