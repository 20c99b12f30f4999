#!/usr/bin/env bash
# Build the container images for real without a registry, then smoke-test each one.
#
#   sudo deploy/docker/build_images.sh                 # server, server-gpu and train
#   sudo deploy/docker/build_images.sh server          # one of them
#
# Where base images cannot be pulled (no Docker Hub here), a Debian bookworm rootfs made
# by debootstrap (python3, pip, venv, passwd) is imported into podman under each
# Dockerfile's FROM tag; `podman build --isolation=chroot` then runs the Dockerfile as
# written. Where containers cannot start (crun refused its cgroups and rlimits here),
# the smoke test runs the image's entry point under chroot on the root of a created
# (never started) container:
#   server, server-gpu: `python -m server` answers grpc.health.v1 SERVING and exports
#                       tcm_ metrics (server-gpu: no GPU here, so its CPU fallback);
#   train:              `python -m train --help` and a CPU torch build.
# Needs root (apt-get, debootstrap, chroot, mounts). Not run in CI (minutes, downloads).
# Work files: $TCM_IMAGE_WORK (default /var/tmp/tcm-images). Exit 0 = every image passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
images=("$@")
[ ${#images[@]} -gt 0 ] || images=(server server-gpu train)
work=${TCM_IMAGE_WORK:-/var/tmp/tcm-images}
mkdir -p "$work"
python=${TCM_PYTHON:-$repo/.venv/bin/python}

say() { echo "build_images: $*" >&2; }
need() {
  command -v "$1" >/dev/null 2>&1 && return
  say "apt-get install $2"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >&2
}
need podman podman
need debootstrap debootstrap

base_tar=$work/bookworm-python.tar
if [ ! -f "$base_tar" ]; then
  rootfs=$work/rootfs
  rm -rf "$rootfs"
  say "debootstrap bookworm (python3, pip, venv, passwd) into $rootfs"
  debootstrap --variant=minbase \
    --include=python3,python3-pip,python3-venv,python-is-python3,passwd,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >&2
  # python:3.11-slim has no PEP 668 marker and a `pip` command; make the stand-in alike
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  ln -sf pip3 "$rootfs/usr/bin/pip"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  tar -C "$rootfs" -cf "$base_tar" .
  rm -rf "$rootfs"
fi

# pip inside the build sees the same wheel cache and constraints as this machine (the CPU
# torch wheel is there: the CUDA build must never be pulled), and trusts the same CAs (a
# TLS-intercepting proxy's CA lives only in the host bundle; the base rootfs lacks it).
# Build-time mounts only: none of it ends up in an image.
build_volumes=()
for path in /opt/wheels /etc/xdg/pip; do
  if [ -e "$path" ]; then build_volumes+=(--volume "$path:$path:ro"); fi
done
printf '[global]\n' >"$work/pip.conf"
if [ -d /opt/wheels ]; then printf 'find-links = /opt/wheels\n' >>"$work/pip.conf"; fi
host_ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$host_ca" ]; then
  build_volumes+=(--volume "$host_ca:/etc/tcm-build-ca.crt:ro")
  printf 'cert = /etc/tcm-build-ca.crt\n' >>"$work/pip.conf"
fi
build_volumes+=(--volume "$work/pip.conf:/etc/pip.conf:ro")

smoke_server() {  # $1 = the mounted root of a created container
  local root=$1 log=$work/smoke-$image.log out
  mkdir -p "$root/tmp/smoke"
  mount -t proc proc "$root/proc"
  mount --bind /dev "$root/dev"
  chroot "$root" env -i PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin HOME=/tmp \
    python -m server --no-auth --port 0 --metrics-port 0 --data-dir /tmp/smoke \
    >"$log" 2>&1 &
  local pid=$! ok=1
  for _ in $(seq 1 120); do
    grep -q "^serving retrieval.v1 on" "$log" && break
    sleep 1
  done
  if out=$(grep "^serving retrieval.v1 on" "$log"); then
    local address=${out#serving retrieval.v1 on }; address=${address%%,*}
    local metrics=${out##* on }
    local health types
    health=$("$python" - "$address" <<'EOF'
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
EOF
)
    types=$(curl -fsS "$metrics" | grep -c '^# TYPE tcm_' || true)
    say "$image: health $health, $types tcm_ metric families"
    [ "$health" = SERVING ] && [ "$types" -ge 20 ] && ok=0
  else
    say "$image: the server did not start; log:"; tail -20 "$log" >&2
  fi
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  umount "$root/dev" "$root/proc"
  return $ok
}

smoke_train() {
  local root=$1
  mount -t proc proc "$root/proc"
  local ok=1
  if chroot "$root" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/tmp python -m train --help \
       >/dev/null \
     && chroot "$root" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/tmp python -c \
       "import torch, sys; print('torch', torch.__version__); sys.exit(torch.version.cuda is not None)"
  then ok=0; fi
  umount "$root/proc"
  return $ok
}

failed=0
for image in "${images[@]}"; do
  dockerfile=deploy/docker/$image.Dockerfile
  [ -f "$dockerfile" ] || { say "no $dockerfile"; exit 2; }
  from=$(sed -n 's/^FROM[[:space:]]\+\([^[:space:]]\+\).*/\1/p' "$dockerfile" | head -1)
  case $from in */*) full=docker.io/$from ;; *) full=docker.io/library/$from ;; esac
  if ! podman image exists "$full"; then
    say "importing the bookworm rootfs as $full (stand-in for the real base image)"
    podman import "$base_tar" "$full" >/dev/null
  fi
  say "podman build $dockerfile"
  podman build --isolation=chroot --pull=never "${build_volumes[@]}" \
    -f "$dockerfile" -t "localhost/tcm-$image:latest" . >&2
  # a container's root is writable (an image mount is read-only: no /tmp for the server);
  # `podman create` only lays out storage, it starts no runtime
  podman rm -f "tcm-smoke-$image" >/dev/null 2>&1 || true
  podman create --name "tcm-smoke-$image" "localhost/tcm-$image:latest" >/dev/null
  root=$(podman mount "tcm-smoke-$image")
  if [ "$image" = train ]; then smoke_train "$root" || failed=1
  else smoke_server "$root" || failed=1; fi
  podman umount "tcm-smoke-$image" >/dev/null
  podman rm "tcm-smoke-$image" >/dev/null
  [ $failed = 0 ] && say "$image: OK" || say "$image: FAILED"
done
exit $failed
