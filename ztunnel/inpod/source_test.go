package inpod

import (
	"errors"
	"net/netip"
	"testing"
)

func TestCheckSource(t *testing.T) {
	tests := []struct {
		name     string
		src, dst string
		usable   bool
	}{
		{"a client IPv4 address towards an IPv4 app is usable", "10.244.2.7", "10.244.1.5", true},
		{"a client IPv6 address towards an IPv6 app is usable", "fd00:10:244:2::7", "fd00:10:244:1::5", true},
		{"an IPv4-mapped client address counts as IPv4", "::ffff:10.244.2.7", "10.244.1.5", true},
		{"a source without a destination to compare is usable", "10.244.2.7", "", true},
		{"an IPv4 client towards an IPv6 app is not", "10.244.2.7", "fd00:10:244:1::5", false},
		{"an IPv6 client towards an IPv4 app is not", "fd00:10:244:2::7", "10.244.1.5", false},
		{"the unspecified address is not", "0.0.0.0", "10.244.1.5", false},
		{"the IPv6 unspecified address is not", "::", "fd00:10:244:1::5", false},
		{"a loopback address is not", "127.0.0.1", "10.244.1.5", false},
		{"the IPv6 loopback address is not", "::1", "fd00:10:244:1::5", false},
		{"a multicast address is not", "224.0.0.1", "10.244.1.5", false},
		{"an IPv6 link-local address is not", "fe80::1", "fd00:10:244:1::5", false},
		{"no address is not", "", "10.244.1.5", false},
	}
	parse := func(s string) netip.Addr {
		if s == "" {
			return netip.Addr{}
		}
		return netip.MustParseAddr(s)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckSource(parse(tt.src), parse(tt.dst))
			switch {
			case tt.usable && err != nil:
				t.Errorf("CheckSource(%s, %s) = %v, want usable", tt.src, tt.dst, err)
			case !tt.usable && !errors.Is(err, ErrUnusableSource):
				t.Errorf("CheckSource(%s, %s) = %v, want ErrUnusableSource", tt.src, tt.dst, err)
			}
		})
	}
}
