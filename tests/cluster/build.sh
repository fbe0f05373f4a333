#!/usr/bin/env bash
# Build kube-apiserver and kube-controller-manager v1.20.2 offline from Debian bookworm's
# `kubernetes` source package, and cache them in
#   ${DETSTREAM_CACHE:-$HOME/.cache/detstream}/kubernetes-v1.20.2/bin/
# Also installs etcd-server and openssl, which the control plane needs at run time.
#
# Nothing a failed or interrupted build leaves is ever trusted: the build runs in a fresh work
# folder that is deleted at exit, and bin/ appears (by one rename) only once both binaries run and
# report v1.20.2. A cached bin/ is trusted only if its binaries still run and report that version.
# `build.sh --cached` exits 0 if the cache is usable, 1 if a build is needed, and changes nothing.
# DETSTREAM_KEEP_BUILD=1 keeps the work folder (~1.7 GB: source tree, Go build cache) for debugging.
set -euo pipefail
# One compound command, parsed whole before it runs: editing this file during a build is safe.
{

VERSION=v1.20.2
CACHE="${DETSTREAM_CACHE:-$HOME/.cache/detstream}/kubernetes-$VERSION"
BIN="$CACHE/bin"
GO=/usr/lib/go-1.19/bin/go
# Debian packages, and the programs from them this script or Kubernetes' own build calls
# (hack/ copies its generators with rsync; make, dpkg-source, go; etcd and openssl at run time).
PKGS=(etcd-server openssl golang-1.19-go golang-github-modern-go-reflect2-dev dpkg-dev make rsync)
PROGRAMS=(etcd openssl "$GO" dpkg-source make rsync flock find sed awk grep tar xz)

log() { echo "[cluster/build] $*" >&2; }
die() { echo "[cluster/build] ERROR: $*" >&2; exit 1; }
trap 'die "step failed (line $LINENO: $BASH_COMMAND)"' ERR
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo

binaries_ok() {  # both binaries present, runnable and of the right version
  local dir="$1"
  "$dir/kube-apiserver" --version 2>/dev/null | grep -q "$VERSION" &&
    "$dir/kube-controller-manager" --version 2>/dev/null | grep -q "$VERSION"
}
have_all() { binaries_ok "$BIN" && command -v etcd >/dev/null && command -v openssl >/dev/null; }
if have_all; then log "cached: $BIN (etcd: $(command -v etcd))"; exit 0; fi
[ "${1:-}" != --cached ] || exit 1   # `build.sh --cached`: only answer whether the cache is usable

# One build at a time per cache (two test runs may start together); the second then finds it cached.
mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9

# --- 1. Debian packages, then every program this build calls ---------------
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
APT_UPDATED=
apt_update() {
  [ -n "$APT_UPDATED" ] || { log "apt-get update"; $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq; APT_UPDATED=1; }
}
if [ ${#missing[@]} -gt 0 ]; then
  apt_update
  log "apt-get install ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
absent=()
for prog in "${PROGRAMS[@]}"; do command -v "$prog" >/dev/null || absent+=("$prog"); done
[ ${#absent[@]} -eq 0 ] || die "programs missing after installing ${PKGS[*]}: ${absent[*]}"
if binaries_ok "$BIN"; then log "cached: $BIN"; exit 0; fi
rm -rf "$BIN" "$CACHE/src" "$CACHE/gopath" "$CACHE/gocache" "$CACHE"/work.*  # left by older or broken builds

# --- 2. deb-src line for bookworm, on the mirror the machine already uses ----
SRCLIST=/etc/apt/sources.list.d/detstream-deb-src.sources
if [ ! -e "$SRCLIST" ]; then
  # deb822 *.sources: the first "Types: deb" stanza whose Suites has plain "bookworm".
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk 'BEGIN { RS = "" }
    /(^|\n)Types:[^\n]*deb/ && /(^|\n)Suites:[^\n]*bookworm([ \t\n]|$)/ {
      if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { s = substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", s); print s; exit } }')
  if [ -z "$mirror" ]; then  # one-line format: deb [opts] URI bookworm main ...
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | sed -E 's/\[[^]]*\]//' |
      awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }')
  fi
  [ -n "$mirror" ] || die "no Debian bookworm mirror found in /etc/apt/sources.list{,.d/}"
  log "adding deb-src for bookworm on $mirror ($SRCLIST)"
  printf 'Types: deb-src\nURIs: %s\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" | $SUDO tee "$SRCLIST" >/dev/null
  APT_UPDATED=
fi

# --- 3. a fresh work folder, removed at exit whatever happens ----------------
WORK=$(mktemp -d "$CACHE/work.XXXXXX")
cleanup() {
  if [ "${DETSTREAM_KEEP_BUILD:-0}" = 1 ]; then log "kept the build folder $WORK"; return; fi
  chmod -R u+w "$WORK" 2>/dev/null || true   # the Go module cache is read-only
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- 4. source package (the orig tarball carries the whole tree with vendor/) -
apt_update
log "apt-get source kubernetes (into $WORK/src)"
mkdir -p "$WORK/src"
(cd "$WORK/src" && apt-get source -qq kubernetes 2>&1) | grep -v -e '^dpkg-source: info' -e 'unsandboxed' >&2 || true
SRC=$(find "$WORK/src" -maxdepth 1 -type d -name 'kubernetes-*really1.20.2' | head -n1)
[ -n "$SRC" ] && [ -d "$SRC/vendor" ] || die "apt-get source kubernetes did not give a 1.20.2 tree with vendor/"

# --- 5. reflect2 1.0.1 (vendored) breaks at run time under Go >= 1.18: use 1.0.2 --
log "replacing vendored github.com/modern-go/reflect2 with Debian's $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"
rm -rf "$SRC/vendor/github.com/modern-go/reflect2"
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$SRC/vendor/github.com/modern-go/reflect2"

# --- 6. GOPATH mode (module mode with -mod=vendor fails on this tree) ---------
export PATH="/usr/lib/go-1.19/bin:$PATH" GO111MODULE=off GOPROXY=off GOFLAGS="" CGO_ENABLED=0
export GOPATH="$WORK/gopath" GOCACHE="$WORK/gocache"
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn "$SRC" "$GOPATH/src/k8s.io/kubernetes"

# The generated OpenAPI definitions are not in the tarball.
log "make gen_openapi"
(cd "$SRC" && make gen_openapi >"$WORK/gen_openapi.log" 2>&1) ||
  { tail -n 30 "$WORK/gen_openapi.log" >&2; die "make gen_openapi failed (the last 30 lines of its log are above)"; }
[ -s "$SRC/pkg/generated/openapi/zz_generated.openapi.go" ] || die "make gen_openapi wrote no OpenAPI definitions"

# --- 7. build; the version is stamped the way hack/lib/version.sh does -------
P=k8s.io/kubernetes/vendor/k8s.io
LDFLAGS="-s -w"
for kv in gitVersion=$VERSION gitMajor=1 gitMinor=20 gitTreeState=archive buildDate=2021-01-13T13:20:00Z; do
  LDFLAGS+=" -X $P/client-go/pkg/version.$kv -X $P/component-base/version.$kv"
done
log "go build kube-apiserver kube-controller-manager ($($GO version | cut -d' ' -f3), 5-10 min on 2 cores)"
mkdir -p "$WORK/bin"
(cd "$GOPATH/src/k8s.io/kubernetes" && $GO build -o "$WORK/bin/" -ldflags "$LDFLAGS" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager) >"$WORK/build.log" 2>&1 ||
  { tail -n 30 "$WORK/build.log" >&2; die "go build failed (the last 30 lines of its log are above)"; }
binaries_ok "$WORK/bin" || die "the built binaries do not run or do not report $VERSION"
mv "$WORK/bin" "$BIN"   # one rename: bin/ appears only when complete
log "done: $BIN"
exit 0
}
