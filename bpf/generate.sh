#!/usr/bin/env bash
# Regenerates the bpf2go output (redirect/redirect_bpf{el,eb}.{go,o}) from
# redirect/redirect.c with the pinned compiler, byte for byte.
#   bpf/generate.sh            regenerate
#   bpf/generate.sh --verify   regenerate into a temporary copy and diff
# Needs Debian's clang-14 and llvm-14 (llvm-strip) and libbpf-dev:
#   apt-get install -y clang-14 llvm-14 libbpf-dev
set -euo pipefail

CLANG_VERSION=14
cd "$(dirname "$0")"

need() { command -v "$1" >/dev/null || { echo "generate.sh: $1 not found (apt-get install -y clang-$CLANG_VERSION llvm-$CLANG_VERSION libbpf-dev)" >&2; exit 1; }; }
need "clang-$CLANG_VERSION"
need "llvm-strip-$CLANG_VERSION"
[[ -f /usr/include/bpf/bpf_helpers.h ]] || { echo "generate.sh: libbpf-dev headers missing" >&2; exit 1; }
got=$("clang-$CLANG_VERSION" -dumpversion)
[[ $got == "$CLANG_VERSION".* ]] || { echo "generate.sh: clang-$CLANG_VERSION reports $got" >&2; exit 1; }

# Debian keeps asm/ under the multiarch directory, which a -target bpf clang
# does not search by itself.
multiarch=$(gcc -dumpmachine 2>/dev/null || "clang-$CLANG_VERSION" -print-target-triple)
multiarch=${multiarch/-pc-/-}
export BPF2GO_CC="clang-$CLANG_VERSION"
export BPF2GO_STRIP="llvm-strip-$CLANG_VERSION"
export BPF2GO_CFLAGS="-O2 -g -Wall -Werror -I/usr/include/$multiarch"

if [[ ${1:-} == --verify ]]; then
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	cp -r . "$tmp/bpf"
	(cd "$tmp/bpf/redirect" && go generate ./...)
	fail=0
	for f in redirect/redirect_bpfel.go redirect/redirect_bpfel.o redirect/redirect_bpfeb.go redirect/redirect_bpfeb.o; do
		cmp -s "$f" "$tmp/bpf/$f" || { echo "generate.sh: $f is stale; run bpf/generate.sh" >&2; fail=1; }
	done
	exit $fail
fi
cd redirect && go generate ./...
