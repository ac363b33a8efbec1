#!/usr/bin/env bash
# prepare.sh — build, once, what a test guest boots from, and cache it.
#
#   integration/guest/prepare.sh            # prints the base directory
#
# The base directory holds:
#   vmlinuz        Debian's stock cloud kernel (it has the NFSv3 client as modules)
#   base.cpio.gz   busybox + the NFS/virtio modules + /init (guest/init)
#                  + mount.nfs (nfs-common) and its libraries
#                  + guest/lib.sh + pure-ftpd and the host libraries it needs
#
# Everything comes from Debian packages: the kernel, busybox-static, nfs-common and
# pure-ftpd .debs are fetched with `apt-get download` (never installed on the
# host) and unpacked in the cache; shared libraries come from the host (same
# distribution), resolved with ldd. Host tools needed: qemu-system-x86 (to run
# it), kmod (depmod/modprobe), cpio, dpkg-deb, apt-get, ldd, gzip.
#
# Cache: $IMZ_GUEST_CACHE, else /var/cache/imz-guest when writable, else
# ${XDG_CACHE_HOME:-~/.cache}/imz-guest. Concurrent callers serialise on a
# lock; a cached base is reused while this script, guest/init, guest/lib.sh
# and the package versions are unchanged (~10 ms).
#
# Exit codes: 0 ok (last stdout line: the base directory), 3 setup failure.
set -euo pipefail

die() { echo "imz-guest prepare: $*" >&2; exit 3; }
HERE=$(cd "$(dirname "$0")" && pwd)

if [ -n "${IMZ_GUEST_CACHE:-}" ]; then
  CACHE=$IMZ_GUEST_CACHE
elif mkdir -p /var/cache/imz-guest 2>/dev/null && [ -w /var/cache/imz-guest ]; then
  CACHE=/var/cache/imz-guest
else
  CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/imz-guest
fi
mkdir -p "$CACHE" || die "cannot create the cache directory $CACHE"
CACHE=$(cd "$CACHE" && pwd)

missing=()
for t in depmod modprobe cpio dpkg-deb apt-get ldd gzip md5sum flock; do
  command -v "$t" >/dev/null || PATH=$PATH:/sbin:/usr/sbin command -v "$t" >/dev/null || missing+=("$t")
done
[ ${#missing[@]} = 0 ] ||
  die "missing host tools: ${missing[*]} (Debian: apt-get install qemu-system-x86 kmod cpio)"
export PATH=$PATH:/sbin:/usr/sbin

exec 9>"$CACHE/.lock"
flock 9

# ------------------------------------------------------------------ packages
# Resolved once, then pinned in the cache (a later kernel in the apt lists
# does not invalidate a working cache; delete $CACHE to move on).
if [ ! -s "$CACHE/packages" ]; then
  resolve() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
      awk '/Depends: linux-image-[0-9]/{print $2; exit}'
  }
  KPKG=$(resolve)
  if [ -z "$KPKG" ]; then
    apt-get update >&2 || die "apt-get update failed (run as root, or run .ci/run once)"
    KPKG=$(resolve)
  fi
  [ -n "$KPKG" ] || die "cannot resolve linux-image-cloud-amd64 in the apt lists"
  echo "$KPKG busybox-static pure-ftpd" > "$CACHE/packages"
fi
# The kernel is the pinned one; the rest is this script's list.
read -r KPKG _ < "$CACHE/packages"
PKGS=("$KPKG" busybox-static pure-ftpd nfs-common)

DEBS=$CACHE/debs
mkdir -p "$DEBS"
need_dl=()
for p in "${PKGS[@]}"; do
  compgen -G "$DEBS/${p}_*.deb" >/dev/null || need_dl+=("$p")
done
if [ ${#need_dl[@]} -gt 0 ]; then
  echo "imz-guest prepare: downloading ${need_dl[*]} (one-time, ~28 MB)" >&2
  tmp=$(mktemp -d "$DEBS/dl.XXXXXX")
  chmod 755 "$tmp"   # apt's _apt user writes here
  # As root, apt drops to the _apt user for downloads unless told not to.
  dl=(apt-get download); [ "$(id -u)" = 0 ] && dl=(apt-get -o APT::Sandbox::User=root download)
  ( cd "$tmp" && "${dl[@]}" "${need_dl[@]}" >&2 ) ||
    { apt-get update >&2 && ( cd "$tmp" && "${dl[@]}" "${need_dl[@]}" >&2 ); } ||
    { rm -rf "$tmp"; die "apt-get download ${need_dl[*]} failed"; }
  mv "$tmp"/*.deb "$DEBS/" && rm -rf "$tmp"
fi
deb_of() { compgen -G "$DEBS/${1}_*.deb" | sort | tail -1; }

# ------------------------------------------------------------------ base
KEY=$( { cat "$0" "$HERE/init" "$HERE/lib.sh"; for p in "${PKGS[@]}"; do basename "$(deb_of "$p")"; done; } |
  md5sum | cut -c1-16)
BASE=$CACHE/base-$KEY
if [ -s "$BASE/base.cpio.gz" ] && [ -s "$BASE/vmlinuz" ]; then
  echo "$BASE"
  exit 0
fi

echo "imz-guest prepare: building $BASE" >&2
W=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$W"' EXIT
dpkg-deb -x "$(deb_of "$KPKG")" "$W/k"
dpkg-deb -x "$(deb_of busybox-static)" "$W/bb"
dpkg-deb -x "$(deb_of pure-ftpd)" "$W/ftp"
dpkg-deb -x "$(deb_of nfs-common)" "$W/nfsc"
KVER=$(ls "$W/k/lib/modules" | head -1)
[ -f "$W/k/boot/vmlinuz-$KVER" ] || die "no vmlinuz in $KPKG"
depmod -b "$W/k" "$KVER"

R=$W/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,mnt,tmp,root,lib/modules,imz/bin}
cp "$W/bb/bin/busybox" "$R/bin/busybox"
: > "$R/lib/modules/load.order"
# virtio_pci/virtio_net: the NIC; nfsv3 pulls sunrpc, lockd, grace, nfs, ...
for m in virtio_pci virtio_net nfsv3; do
  modprobe -d "$W/k" -S "$KVER" --show-depends "$m" || die "modprobe --show-depends $m"
done | awk '$1=="insmod"{print $2}' | awk '!seen[$0]++' | while read -r f; do
  b=$(basename "$f"); b=${b%.xz}; b=${b%.zst}; b=${b%.gz}
  case "$f" in
    *.xz) xz -dc "$f" > "$R/lib/modules/$b" ;;
    *.zst) zstd -qdc "$f" > "$R/lib/modules/$b" ;;
    *.gz) gzip -dc "$f" > "$R/lib/modules/$b" ;;
    *) cp "$f" "$R/lib/modules/$b" ;;
  esac
  echo "$b" >> "$R/lib/modules/load.order"
done
grep -q '^nfsv3\.ko$' "$R/lib/modules/load.order" || die "module list incomplete"

# pure-ftpd (busybox has no ftpd) with the host's copies of its libraries.
cp "$W/ftp/usr/sbin/pure-ftpd" "$R/usr/sbin/pure-ftpd"
copy_libs() {
  local out
  out=$(ldd "$1") || die "ldd $1 failed"
  if grep -q 'not found' <<<"$out"; then
    die "libraries of $1 missing on the host: $(grep 'not found' <<<"$out" | tr -s '\t\n' '  ')"
  fi
  awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' <<<"$out" | while read -r lib; do
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
  done
}
copy_libs "$R/usr/sbin/pure-ftpd"
# mount.nfs (nfs-utils), the mount helper of real Linux machines, for the
# test of the bare `mount -t nfs HOST:/imz`: it asks the portmapper, through
# libtirpc, which needs its transports list, and names protocols.
cp "$W/nfsc/sbin/mount.nfs" "$R/sbin/mount.nfs"
copy_libs "$R/sbin/mount.nfs"
[ -s /etc/netconfig ] || die "/etc/netconfig missing on the host (Debian: libtirpc-common)"
cp /etc/netconfig "$R/etc/netconfig"
printf 'ip 0 IP\ntcp 6 TCP\nudp 17 UDP\n' > "$R/etc/protocols"
# ld.so looks in /lib/x86_64-linux-gnu by default on Debian; /lib64 holds the loader.
printf 'root:x:0:0:root:/root:/bin/sh\nftp:x:21:21:ftp:/mnt:/bin/false\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$R/etc/passwd"
printf 'root:x:0:\nftp:x:21:\nnogroup:x:65534:\n' > "$R/etc/group"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files\n' > "$R/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n10.0.2.2 host\n10.0.2.100 imz-host\n' > "$R/etc/hosts"
install -m 755 "$HERE/init" "$R/init"
install -m 644 "$HERE/lib.sh" "$R/imz/lib.sh"

mkdir -p "$W/out"
(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1) > "$W/out/base.cpio.gz"
cp "$W/k/boot/vmlinuz-$KVER" "$W/out/vmlinuz"
echo "$KPKG $KVER" > "$W/out/kernel"
rm -rf "$BASE"
mv "$W/out" "$BASE"
# Bases of other versions of these files (other checkouts may still use
# them): dropped once unused for a few days.
find "$CACHE" -maxdepth 1 -name 'base-*' ! -name "base-$KEY" -mtime +3 -exec rm -rf {} + 2>/dev/null || true
echo "$BASE"
