package inpod

import (
	"errors"
	"fmt"
	"net/netip"
)

// ErrUnusableSource is returned (wrapped) by DialFrom and CheckSource for a
// source address that a transparent dial cannot take.
var ErrUnusableSource = errors.New("unusable transparent source")

// CheckSource reports whether a connection to dst can be opened from the
// foreign address src (see DialFrom): src must be a unicast address a reply
// can be routed to, of dst's address family. It returns an error wrapping
// ErrUnusableSource that says why not. An invalid dst skips the family check.
func CheckSource(src, dst netip.Addr) error {
	src, dst = src.Unmap(), dst.Unmap()
	why := ""
	switch {
	case !src.IsValid():
		return fmt.Errorf("%w: no address", ErrUnusableSource)
	case src.IsUnspecified():
		why = "is unspecified"
	case src.IsLoopback():
		why = "is a loopback address"
	case src.IsMulticast():
		why = "is a multicast address"
	case src.Zone() != "" || src.Is6() && src.IsLinkLocalUnicast():
		// Meaningful only with an interface, which the pod's netns does
		// not share with the client.
		why = "is link-local"
	case dst.IsValid() && src.Is4() != dst.Is4():
		why = fmt.Sprintf("is not of the address family of %s", dst)
	default:
		return nil
	}
	return fmt.Errorf("%w: %s %s", ErrUnusableSource, src, why)
}
