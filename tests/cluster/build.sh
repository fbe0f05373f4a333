#!/usr/bin/env bash
# Build kube-apiserver and kube-controller-manager v1.20.2 offline from Debian
# bookworm's `kubernetes` source package, and cache them in
#   ${DETSTREAM_CACHE:-$HOME/.cache/detstream}/kubernetes-v1.20.2/bin/
# Also installs etcd-server and openssl, which the control plane needs at run time.
# Idempotent: every step is skipped when its result is already there.
# DETSTREAM_KEEP_BUILD=1 keeps the source tree and Go build cache (~1.7 GB) after a build.
set -euo pipefail

VERSION=v1.20.2
CACHE="${DETSTREAM_CACHE:-$HOME/.cache/detstream}/kubernetes-$VERSION"
BIN="$CACHE/bin"
GO=/usr/lib/go-1.19/bin/go
PKGS=(etcd-server openssl golang-1.19-go golang-github-modern-go-reflect2-dev dpkg-dev make)

log() { echo "[cluster/build] $*" >&2; }
die() { echo "[cluster/build] ERROR: $*" >&2; exit 1; }
trap 'die "step failed (line $LINENO: $BASH_COMMAND)"' ERR
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo

have_all() {
  [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ] &&
    command -v etcd >/dev/null && command -v openssl >/dev/null
}
if have_all; then log "cached: $BIN (etcd: $(command -v etcd))"; exit 0; fi

# One build at a time per cache (two test runs may start together); the second then finds it cached.
mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9

# --- 1. Debian packages -------------------------------------------------------
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
APT_UPDATED=
apt_update() { [ -n "$APT_UPDATED" ] || { log "apt-get update"; $SUDO apt-get update -qq; APT_UPDATED=1; }; }
if [ ${#missing[@]} -gt 0 ]; then
  apt_update
  log "apt-get install ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ]; then log "cached: $BIN"; exit 0; fi

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

# --- 3. source package (the orig tarball carries the whole tree with vendor/) -
mkdir -p "$CACHE/src"
find_src() { find "$CACHE/src" -maxdepth 1 -type d -name 'kubernetes-*really1.20.2' | head -n1; }
SRC=$(find_src)
if [ -z "$SRC" ] || [ ! -e "$SRC/.detstream-extracted" ]; then
  apt_update
  log "apt-get source kubernetes (into $CACHE/src)"
  rm -rf "$CACHE"/src/kubernetes*
  (cd "$CACHE/src" && apt-get source -qq kubernetes 2>&1) | grep -v -e '^dpkg-source: info' -e 'unsandboxed' >&2 || true
  SRC=$(find_src)
  if [ -z "$SRC" ] || [ ! -d "$SRC/vendor" ]; then die "apt-get source kubernetes did not give a 1.20.2 tree with vendor/"; fi
  touch "$SRC/.detstream-extracted"
fi

# --- 4. reflect2 1.0.1 (vendored) breaks at run time under Go >= 1.18: use 1.0.2 --
R2=/usr/share/gocode/src/github.com/modern-go/reflect2
if [ ! -e "$SRC/vendor/github.com/modern-go/reflect2/go_above_118.go" ]; then
  log "replacing vendored github.com/modern-go/reflect2 with Debian's $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"
  rm -rf "$SRC/vendor/github.com/modern-go/reflect2"
  cp -r "$R2" "$SRC/vendor/github.com/modern-go/reflect2"
fi

# --- 5. GOPATH mode (module mode with -mod=vendor fails on this tree) ---------
export PATH="/usr/lib/go-1.19/bin:$PATH" GO111MODULE=off GOPROXY=off GOFLAGS="" CGO_ENABLED=0
export GOPATH="$CACHE/gopath" GOCACHE="$CACHE/gocache"
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn "$SRC" "$GOPATH/src/k8s.io/kubernetes"

# The generated OpenAPI definitions are not in the tarball.
if [ ! -s "$SRC/pkg/generated/openapi/zz_generated.openapi.go" ]; then
  log "make gen_openapi"
  (cd "$SRC" && make gen_openapi >"$CACHE/gen_openapi.log" 2>&1) ||
    { rm -f "$SRC/pkg/generated/openapi/zz_generated.openapi.go"; tail -n 30 "$CACHE/gen_openapi.log" >&2; die "make gen_openapi failed (log: $CACHE/gen_openapi.log)"; }
fi

# --- 6. build; the version is stamped the way hack/lib/version.sh does -------
P=k8s.io/kubernetes/vendor/k8s.io
LDFLAGS="-s -w"
for kv in gitVersion=$VERSION gitMajor=1 gitMinor=20 gitTreeState=archive buildDate=2021-01-13T13:20:00Z; do
  LDFLAGS+=" -X $P/client-go/pkg/version.$kv -X $P/component-base/version.$kv"
done
log "go build kube-apiserver kube-controller-manager ($($GO version | cut -d' ' -f3), 5-10 min on 2 cores)"
rm -rf "$CACHE/bin.tmp" && mkdir -p "$CACHE/bin.tmp"
(cd "$GOPATH/src/k8s.io/kubernetes" && $GO build -o "$CACHE/bin.tmp/" -ldflags "$LDFLAGS" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager) >"$CACHE/build.log" 2>&1 ||
  { tail -n 30 "$CACHE/build.log" >&2; die "go build failed (log: $CACHE/build.log)"; }
"$CACHE/bin.tmp/kube-apiserver" --version | grep -q "$VERSION" || die "built kube-apiserver does not report $VERSION"
rm -rf "$BIN" && mv "$CACHE/bin.tmp" "$BIN"   # appears only when complete
if [ "${DETSTREAM_KEEP_BUILD:-0}" != 1 ]; then
  chmod -R u+w "$GOPATH" "$GOCACHE" 2>/dev/null || true
  rm -rf "$CACHE/src" "$GOPATH" "$GOCACHE"
fi
log "done: $BIN"
