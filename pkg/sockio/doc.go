// Package sockio reads and writes TCP sockets without the Go runtime's
// system-call bookkeeping.
//
// Every read and write of a *net.TCPConn enters the kernel through
// syscall.Syscall, which tells the scheduler that the goroutine may block:
// entersyscall, and, when the process was idle, a futex wake of the
// runtime's monitor thread (sysmon), which then polls every 20 µs until
// the process is idle again. A proxy at 1,000 requests per second is idle
// between most requests, so most of its reads and writes woke sysmon:
// profiles of ztunnel under that load showed a quarter of its CPU in
// sysmon's wakes and sleeps.
//
// The sockets of the net package are non-blocking: a read or write either
// completes at once or returns EAGAIN. Conn makes those calls with
// syscall.RawSyscall, which the scheduler does not track, and waits for
// readiness in the runtime's network poller as net does (through
// syscall.RawConn), so deadlines, Close and the poller behave exactly as
// for the wrapped connection.
package sockio
