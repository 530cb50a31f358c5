#!/usr/bin/env bash
# build-kube.sh builds the local cluster's Kubernetes programs (one multi-call
# binary, see e2e/kube/README.md) and the standard CNI plugins from the Go module
# proxy alone, into ${AMBIENT_CACHE:-/var/cache/ambient-mesh}. Versions come from
# e2e/kube/go.mod. A build is skipped while the stamp (a hash of the module's
# files, this script and the Go version) matches. The last two lines on stdout are
#   KUBE_BIN=<dir with kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, kubectl>
#   CNI_BIN=<dir with bridge, host-local, loopback, portmap>
# so callers can `eval "$(e2e/hack/build-kube.sh | tail -2)"`. Everything else goes
# to stderr. Needs only Go (the version in e2e/kube/go.mod) and coreutils.
set -euo pipefail

mod_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../kube" && pwd)"
script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
cache="${AMBIENT_CACHE:-/var/cache/ambient-mesh}"

# e2e/kube is not in go.work (its dependency graph would drag the whole
# workspace onto Kubernetes' pins); -mod=readonly holds the build to the
# committed go.sum; -buildvcs=false as the module sits in a bigger repository.
export GOWORK=off CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
cd "$mod_dir"

log() { echo "build-kube: $*" >&2; }

kube_version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"
cni_version="$(go list -m -f '{{.Version}}' github.com/containernetworking/plugins)"
kube_bin="$cache/kube-$kube_version"
cni_bin="$cache/cni-plugins-$cni_version"

stamp="$(
	{
		go env GOVERSION GOOS GOARCH
		cat "$script" go.mod go.sum
		for f in *.go; do echo "$f"; cat "$f"; done
	} | sha256sum | cut -d' ' -f1
)"

current() { [[ -x "$1/$2" && "$(cat "$1/.stamp" 2>/dev/null)" == "$stamp" ]]; }

mkdir -p "$cache"
# Two builds at once (a developer and CI on one machine) take turns; the second
# then finds the first one's stamp.
exec 9>"$cache/.build-kube.lock"
flock 9

if current "$kube_bin" kube && current "$cni_bin" bridge; then
	log "up to date: $kube_bin $cni_bin"
else
	tmp="$(mktemp -d "$cache/.build-kube.XXXXXX")"
	trap 'rm -rf "$tmp"' EXIT
	mkdir "$tmp/kube" "$tmp/cni"

	# Stamp the version the way Kubernetes' hack/lib/version.sh does, so
	# `kubectl version` and the apiserver's version skew checks see a release. The
	# module zip has no git metadata: gitCommit stays empty and buildDate is the
	# release's module time, so the build is reproducible.
	build_date="$(go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"
	minor="${kube_version#v*.}"
	minor="${minor%%.*}"
	major="${kube_version#v}"
	major="${major%%.*}"
	ldflags="-s -w"
	for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
		ldflags+=" -X $pkg.gitCommit= -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
	done

	start=$SECONDS
	log "building kube $kube_version (first build takes a while on 2 cores)"
	nice go build -trimpath -ldflags "$ldflags" -o "$tmp/kube/kube" .
	for name in kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl; do
		ln -s kube "$tmp/kube/$name"
	done
	log "building CNI plugins $cni_version"
	# The plugins are the module's `tool` packages in go.mod.
	nice go build -trimpath \
		-ldflags "-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$cni_version" \
		-o "$tmp/cni/" tool
	echo "$stamp" >"$tmp/kube/.stamp"
	echo "$stamp" >"$tmp/cni/.stamp"

	rm -rf "$kube_bin" "$cni_bin"
	mv "$tmp/kube" "$kube_bin"
	mv "$tmp/cni" "$cni_bin"
	log "built in $((SECONDS - start))s: $kube_bin $cni_bin"
fi

echo "KUBE_BIN=$kube_bin"
echo "CNI_BIN=$cni_bin"
