package redirect

// Run through ../generate.sh, which pins the compiler (clang-14) and flags.
//go:generate go tool bpf2go -cc clang-14 -strip llvm-strip-14 -go-package redirect -type pod_addr redirect redirect.c
