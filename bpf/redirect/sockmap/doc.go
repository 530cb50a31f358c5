// Package sockmap is the part of the eBPF redirection engine that ztunnel
// links: the facts both sides agree on (ztunnel's mark and ports, the slots of
// the sockets map, where the node agent pins it) and [Register], which puts
// ztunnel's listening sockets into a pod's pinned SOCKMAP.
//
// Registering takes three bpf(2) commands (BPF_OBJ_GET on the pin,
// BPF_OBJ_GET_INFO_BY_FD to check it is the SOCKMAP it should be,
// BPF_MAP_UPDATE_ELEM per socket), made here with golang.org/x/sys/unix so
// that ztunnel does not link github.com/cilium/ebpf, whose code (BTF, ELF,
// the assembler) it would only fault into memory at start-up. The engine
// itself, which loads and attaches the program, is the parent package
// bpf/redirect.
//
// Privileges: CAP_NET_ADMIN (or CAP_SYS_ADMIN) to insert sockets, and read
// access to the pins in bpffs.
package sockmap
