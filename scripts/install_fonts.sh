#!/usr/bin/env bash
# Install the fonts of the out-of-domain `novel` image set (imagesets/novel.py):
# Debian's fonts-noto-core, fonts-freefont-ttf and fonts-unifont.
# Idempotent: does nothing when all three are already present.
set -euo pipefail
packages=(fonts-noto-core fonts-freefont-ttf fonts-unifont)
# One file per package that the novel set cannot do without.
markers=(
  /usr/share/fonts/truetype/noto/NotoSansCherokee-Regular.ttf
  /usr/share/fonts/truetype/freefont/FreeSerif.ttf
  /usr/share/fonts/opentype/unifont/unifont.otf
)
missing=0
for marker in "${markers[@]}"; do
  [ -f "$marker" ] || missing=1
done
if [ $missing = 0 ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_fonts: need root or sudo to apt-get install ${packages[*]}" >&2; exit 1; }
  sudo=sudo
fi
echo "install_fonts: apt-get install ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >&2
$sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >&2
for marker in "${markers[@]}"; do
  [ -f "$marker" ] || { echo "install_fonts: $marker is still missing after the install" >&2; exit 1; }
done
