package redirect

import (
	"errors"
	"fmt"

	"github.com/containernetworking/plugins/pkg/ns"
)

// Do runs fn on a locked OS thread switched into the network namespace at
// netnsPath and passes fn a handle to that namespace. Sockets fn opens (netlink
// included) belong to that namespace. A netnsPath that does not exist yields an
// error wrapping ErrNetnsGone.
//
// fn must not start goroutines that expect to run in the namespace: only the
// calling thread is switched.
func Do(netnsPath string, fn func(target ns.NetNS) error) error {
	target, err := ns.GetNS(netnsPath)
	if err != nil {
		var notExist ns.NSPathNotExistErr
		if errors.As(err, &notExist) {
			return fmt.Errorf("%w: %s", ErrNetnsGone, netnsPath)
		}
		return fmt.Errorf("opening netns %s: %w", netnsPath, err)
	}
	defer target.Close()
	// ns.Do locks the thread, switches, runs, switches back, and leaves the thread
	// locked (so the runtime discards it) if switching back fails.
	return target.Do(func(ns.NetNS) error { return fn(target) })
}
