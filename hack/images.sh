#!/usr/bin/env bash
# `make images`: OCI images of berth-controller and berth-nodeproxy, without a Docker
# daemon, from Debian packages only.
#
#  1. A root filesystem per image from Debian bookworm with mmdebstrap's `extract` variant:
#     the listed packages and their dependencies are unpacked, no maintainer script runs,
#     so no shell, dpkg or apt is needed or left. The controller gets glibc, libgcc and the
#     CA bundle; the agent also nft, ip and conntrack with their libraries. Documentation,
#     debconf, the dpkg/apt state and anything that could start a shell are removed.
#  2. Two layers (that root filesystem; the stripped binary in /usr/local/bin) as
#     deterministic tarballs (sorted, owner 0, mtimes clamped to SOURCE_DATE_EPOCH),
#     assembled with umoci into an OCI image layout target/images/<name>/, tagged
#     <crate version>-<short commit>[-dirty] and <crate version> (the chart's appVersion).
#
# PROFILE=release (default) builds the binaries with cargo first; PROFILE=debug takes the
# debug build as it is (what `make test` and `make demo` use). DEBIAN_MIRROR and
# DEBIAN_SECURITY override the archive (default: the machine's apt sources, else
# deb.debian.org); point them at snapshot.debian.org for bit-identical rebuilds later.
# Root filesystems are cached in ~/.cache/berth/images keyed on this script and the
# archive; an image whose inputs are unchanged is not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${PROFILE:-release}
target=${CARGO_TARGET_DIR:-target}
out=$target/images
cache=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}/images
suite=bookworm
arch=amd64

log() { echo "[images] $*" >&2; }
die() {
  echo "[images] error: $*" >&2
  exit 1
}

for tool in mmdebstrap umoci tar strip sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is missing: run hack/install-deps.sh"
done
[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap's root mode keeps file ownership)"

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || die "no [workspace.package] version in Cargo.toml"
git rev-parse --verify -q HEAD >/dev/null || die "not a git checkout: the tag names the commit"
sha=$(git rev-parse --short=7 HEAD)
dirty=""
git diff --quiet HEAD -- 2>/dev/null || dirty=-dirty
tag=$version-$sha$dirty
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)

# The first Debian archive URI of the machine's apt sources ending in $1 (one-line or
# deb822 format), so the images come from the archive this machine is configured for.
host_uri() {
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    grep -oE '(https?|file)://[^ ]+' | grep -E "$1/?\$" | head -1 || true
}
mirror=${DEBIAN_MIRROR:-$(host_uri /debian)}
mirror=${mirror:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY:-$(host_uri /debian-security)}
security=${security:-http://deb.debian.org/debian-security}
sources="deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main"

# Paths no image needs: docs, debconf (its Perl scripts), package-manager state, iconv
# modules (nothing here converts charsets), OpenSSL (only ca-certificates pulls it in),
# capability tools, and every shell.
prune=(
  usr/share/doc usr/share/man usr/share/info usr/share/locale usr/share/lintian
  usr/share/bug usr/share/debconf usr/share/perl5 usr/share/pixmaps usr/share/menu
  usr/bin/debconf usr/bin/debconf-apt-progress usr/bin/debconf-communicate
  usr/bin/debconf-copydb usr/bin/debconf-escape usr/bin/debconf-set-selections
  usr/bin/debconf-show var/lib/dpkg var/lib/apt var/cache var/log etc/apt etc/dpkg
  usr/lib/x86_64-linux-gnu/gconv usr/include usr/bin/openssl usr/lib/ssl/misc
  usr/sbin/update-ca-certificates etc/ca-certificates etc/ca-certificates.conf
  sbin/capsh sbin/getcap sbin/getpcaps sbin/setcap usr/sbin/routel
  usr/sbin/dpkg-preconfigure usr/sbin/dpkg-reconfigure usr/share/bash-completion
  usr/bin/c_rehash usr/lib/x86_64-linux-gnu/engines-3 usr/lib/x86_64-linux-gnu/ossl-modules
  usr/lib/x86_64-linux-gnu/libssl.so.3 usr/lib/x86_64-linux-gnu/libcrypto.so.3
  etc/debconf.conf etc/fstab etc/hostname etc/resolv.conf dev
  bin/sh bin/dash bin/bash usr/bin/sh usr/bin/dash usr/bin/bash usr/bin/perl
)

# make_rootfs NAME PACKAGES: the base layer tarball of NAME (cached).
make_rootfs() {
  local name=$1 packages=$2 key dir tarball
  key=$(printf '%s\n%s\n%s\n' "$packages" "$sources" "$(sha256sum <"$0")" | sha256sum | cut -c1-16)
  tarball=$cache/$name-rootfs-$key.tar
  if [ -s "$tarball" ] && [ -z "${BERTH_IMAGES_REFRESH:-}" ]; then
    echo "$tarball"
    return
  fi
  mkdir -p "$cache"
  dir=$(mktemp -d "${TMPDIR:-/tmp}/berth-rootfs-$name.XXXXXX")
  log "$name: root filesystem from $suite ($mirror): $packages"
  if ! printf '%s\n' "$sources" | mmdebstrap --quiet --variant=extract --mode=root \
    --format=directory --architecture="$arch" --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/doc/*' "$suite" "$dir" - >&2; then
    rm -rf "$dir"
    die "mmdebstrap failed for $name"
  fi
  finish_rootfs "$dir"
  deterministic_tar "$dir" "$tarball.tmp"
  mv "$tarball.tmp" "$tarball"
  rm -rf "$dir"
  echo "$tarball"
}

# The rootfs as a running container expects it: no shells or package state, the CA
# bundle update-ca-certificates would have written, users for 0 and 65532 (nonroot),
# and the directories the runtime mounts over.
finish_rootfs() {
  local dir=$1 p
  if [ -d "$dir/usr/share/ca-certificates/mozilla" ]; then
    mkdir -p "$dir/etc/ssl/certs"
    find "$dir/usr/share/ca-certificates/mozilla" -name '*.crt' -print0 | LC_ALL=C sort -z |
      xargs -0 cat >"$dir/etc/ssl/certs/ca-certificates.crt"
  fi
  for p in "${prune[@]}"; do rm -rf "${dir:?}/$p"; done
  printf 'root:x:0:0:root:/root:/nonexistent\nnonroot:x:65532:65532:nonroot:/home/nonroot:/nonexistent\n' >"$dir/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$dir/etc/group"
  printf 'hosts: files dns\n' >"$dir/etc/nsswitch.conf"
  mkdir -p "$dir"/{proc,sys,dev,run,tmp,root,home/nonroot,var/run,usr/local/bin}
  chmod 1777 "$dir/tmp"
  chown 65532:65532 "$dir/home/nonroot"
  # Every program left must find its libraries after the pruning above.
  for p in "$dir"/{bin,sbin,usr/bin,usr/sbin}/*; do
    [ -f "$p" ] && [ ! -L "$p" ] || continue
    if chroot "$dir" /lib64/ld-linux-x86-64.so.2 --list "${p#"$dir"}" 2>&1 | grep -q 'not found'; then
      die "${p#"$dir"} misses a library in the root filesystem"
    fi
  done
  # Anything left that can interpret commands would defeat "no shell": fail loudly.
  for p in bin/sh bin/bash bin/dash usr/bin/perl usr/bin/dpkg usr/bin/apt usr/bin/apt-get; do
    [ ! -e "$dir/$p" ] || die "$p is still in the root filesystem"
  done
}

# deterministic_tar DIR FILE: the same bytes for the same tree, whenever it is built.
deterministic_tar() {
  tar --create --file="$2" --directory="$1" --sort=name --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    --mtime="@$SOURCE_DATE_EPOCH" --clamp-mtime --numeric-owner --owner=0 --group=0 .
}

# binary NAME: the path of the built binary for $profile.
binary() {
  local path=$target/$profile/$1
  [ -x "$path" ] || die "$path is missing: build it (cargo build ${profile/debug/} --bin $1)"
  echo "$path"
}

# build_image NAME PACKAGES USER: the OCI layout $out/NAME.
build_image() {
  local name=$1 packages=$2 user=$3 bin base key layout work
  bin=$(binary "$name")
  base=$(make_rootfs "$name" "$packages")
  layout=$out/$name
  key=$(printf '%s\n' "$tag" "$SOURCE_DATE_EPOCH" "$user" "$(basename "$base")" "$(sha256sum <"$bin")" | sha256sum | cut -c1-64)
  if [ -f "$layout/berth-inputs" ] && [ "$(cat "$layout/berth-inputs")" = "$key" ]; then
    log "$name:$tag is up to date ($layout)"
    return
  fi
  work=$(mktemp -d "${TMPDIR:-/tmp}/berth-image-$name.XXXXXX")
  mkdir -p "$work/app/usr/local/bin"
  strip --strip-debug -o "$work/app/usr/local/bin/$name" "$bin"
  deterministic_tar "$work/app" "$work/app.tar"
  rm -rf "$work/oci"
  umoci init --layout "$work/oci"
  umoci new --image "$work/oci:$tag"
  umoci raw add-layer --image "$work/oci:$tag" --history.created="$created" \
    --history.created_by="mmdebstrap --variant=extract $suite: $packages" "$base"
  umoci raw add-layer --image "$work/oci:$tag" --history.created="$created" \
    --history.created_by="berth $profile build: /usr/local/bin/$name" "$work/app.tar"
  umoci config --image "$work/oci:$tag" --created="$created" --author="berth" \
    --os=linux --architecture="$arch" --config.user="$user" --config.workingdir=/ \
    --config.entrypoint="/usr/local/bin/$name" \
    --config.env="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --config.label="org.opencontainers.image.version=$tag" \
    --config.label="org.opencontainers.image.revision=$(git rev-parse HEAD)$dirty" \
    --config.label="org.opencontainers.image.source=https://github.com/berth-dev/berth" \
    --config.label="dev.berth.profile=$profile" \
    --history.created="$created" --history.created_by="berth image config"
  umoci tag --image "$work/oci:$tag" "$version"
  umoci gc --layout "$work/oci"
  echo "$key" >"$work/oci/berth-inputs"
  mkdir -p "$out"
  rm -rf "$layout"
  mv "$work/oci" "$layout"
  rm -rf "$work"
  log "$name:$tag built ($layout)"
}

# size NAME: compressed size of the image (manifest, config and layers) in MB.
report() {
  local name=$1 layout=$out/$1 digest
  digest=$(jq -r --arg t "$tag" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$layout/index.json")
  printf '%-16s %-22s %s  %s MB compressed\n' "$name" "$tag" "$digest" \
    "$(du -sm --apparent-size "$layout/blobs" | cut -f1)"
}

if [ "$profile" = release ]; then
  cargo build --release --locked -p berth-controller --bin berth-controller \
    -p berth-nodeproxy --bin berth-nodeproxy
fi
build_image berth-controller libc6,libgcc-s1,ca-certificates 65532:65532
build_image berth-nodeproxy libc6,libgcc-s1,nftables,iproute2,conntrack 0:0
report berth-controller
report berth-nodeproxy
