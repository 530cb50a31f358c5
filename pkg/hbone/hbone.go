// Package hbone implements HBONE, the mesh's tunnel protocol: HTTP/2 CONNECT
// streams over mutual TLS 1.3 (ALPN "h2") between workloads identified by
// SPIFFE IDs, wire-compatible with Istio's ztunnel.
//
// A Server terminates HBONE on port 15008: it accepts TLS connections,
// serves one CONNECT stream per tunneled TCP connection, asks a Handler for
// the upstream connection and copies bytes both ways. A Pool originates
// HBONE: it keeps HTTP/2 connections per (source identity, destination
// identity, destination address), opens CONNECT streams on them and hands
// each stream back as a net.Conn.
//
// The package must not depend on Kubernetes libraries: ztunnel links it.
package hbone

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strconv"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Port is the HBONE port on every enrolled pod and waypoint.
const Port = 15008

// alpnH2 is the only ALPN protocol HBONE speaks.
const alpnH2 = "h2"

// Header names carried on the CONNECT request, canonical as http.Header
// keys them.
const (
	headerForwarded   = "Forwarded"   // RFC 7239, for="<client ip:port>"
	headerBaggage     = "Baggage"     // W3C baggage
	headerTraceparent = "Traceparent" // W3C trace context
)

// The same names as on the wire: HTTP/2 field names are lowercase (RFC
// 9113 §8.2.1).
const (
	wireForwarded   = "forwarded"
	wireBaggage     = "baggage"
	wireTraceparent = "traceparent"
)

// maxBaggageLen is the W3C baggage limit; longer values are dropped.
const maxBaggageLen = 8192

// Request is one CONNECT stream as seen by a Server's Handler.
type Request struct {
	// Authority is the :authority of the CONNECT request, "ip:port" or
	// "[v6]:port", as the client sent it.
	Authority string
	// Addr is Authority parsed (IPv4-mapped IPv6 addresses unmapped).
	Addr netip.AddrPort
	// Peer is the SPIFFE ID of the verified client certificate.
	Peer spiffeid.ID
	// PeerAddr is the TCP address the TLS connection came from.
	PeerAddr netip.AddrPort
	// Forwarded is the raw forwarded header ("" when absent).
	Forwarded string
	// ForwardedFor is the for= address of the first forwarded element;
	// the zero value when absent or unparseable, port 0 when none was given.
	ForwardedFor netip.AddrPort
	// Baggage and Traceparent are the W3C trace headers; invalid or
	// oversized values are dropped, as the W3C specs ask.
	Baggage, Traceparent string
}

// Headers are the optional request headers a Pool sends on CONNECT.
type Headers struct {
	// ForwardedFor, when valid, is sent as forwarded: for="ip:port"
	// (port omitted when 0).
	ForwardedFor netip.AddrPort
	// Baggage and Traceparent are sent verbatim when not empty.
	Baggage, Traceparent string
}

// StatusError is returned by Pool.Connect when the server answers the
// CONNECT with anything but 200.
type StatusError struct {
	Code int
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("hbone: connect refused: %d %s", e.Code, http.StatusText(e.Code))
}

// ErrPeerIdentity is returned (wrapped) by Pool.Connect when the server's
// certificate does not carry the expected SPIFFE ID.
var ErrPeerIdentity = errors.New("hbone: unexpected peer identity")

// errBadAuthority is why a CONNECT authority is refused.
var errBadAuthority = errors.New("authority must be ip:port")

// parseAuthority parses a CONNECT authority: "ip:port" or "[v6]:port",
// a non-zero port and no IPv6 zone.
func parseAuthority(s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w: %w", errBadAuthority, err)
	}
	if ap.Port() == 0 {
		return netip.AddrPort{}, fmt.Errorf("%w: port 0", errBadAuthority)
	}
	if ap.Addr().Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("%w: zone not allowed", errBadAuthority)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

// validateRequest checks a CONNECT request and extracts what a Handler
// needs. It returns a non-zero HTTP status when the request is refused.
func validateRequest(method, authority string, h http.Header) (*Request, int) {
	if method != http.MethodConnect {
		return nil, http.StatusMethodNotAllowed
	}
	addr, err := parseAuthority(authority)
	if err != nil {
		return nil, http.StatusBadRequest
	}
	req := &Request{Authority: authority, Addr: addr}
	if v := h.Values(headerForwarded); len(v) > 0 {
		req.Forwarded = strings.Join(v, ", ")
		req.ForwardedFor, _ = parseForwardedFor(req.Forwarded)
	}
	if v := h.Values(headerBaggage); len(v) > 0 {
		if b := strings.Join(v, ","); len(b) <= maxBaggageLen {
			req.Baggage = b
		}
	}
	if v := h.Get(headerTraceparent); validTraceparent(v) {
		req.Traceparent = v
	}
	return req, 0
}

// parseForwardedFor returns the for= address of the first element of an
// RFC 7239 forwarded header. It accepts quoted and bare values, with or
// without a port, and bare IPv6 (which some senders emit).
func parseForwardedFor(v string) (netip.AddrPort, bool) {
	// The first element ends at the first comma outside a quoted string.
	inQuote := false
	for i := 0; i < len(v); i++ {
		switch v[i] {
		case '"':
			inQuote = !inQuote
		case '\\':
			if inQuote {
				i++
			}
		case ',':
			if !inQuote {
				v = v[:i]
			}
		}
	}
	for pair := range strings.SplitSeq(v, ";") {
		k, val, ok := strings.Cut(strings.TrimSpace(pair), "=")
		if !ok || !strings.EqualFold(strings.TrimSpace(k), "for") {
			continue
		}
		val = strings.TrimSpace(val)
		if len(val) >= 2 && val[0] == '"' && val[len(val)-1] == '"' {
			if uq, err := strconv.Unquote(val); err == nil {
				val = uq
			} else {
				val = val[1 : len(val)-1]
			}
		}
		if ap, err := netip.ParseAddrPort(val); err == nil {
			return ap, true
		}
		if a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(val, "["), "]")); err == nil {
			return netip.AddrPortFrom(a, 0), true
		}
		return netip.AddrPort{}, false
	}
	return netip.AddrPort{}, false
}

// formatForwarded renders a forwarded header value for ap.
func formatForwarded(ap netip.AddrPort) string {
	a := ap.Addr()
	switch {
	case ap.Port() != 0:
		return `for="` + ap.String() + `"`
	case a.Is6() && !a.Is4In6():
		return `for="[` + a.String() + `]"`
	default:
		return "for=" + a.String()
	}
}

// validTraceparent reports whether v is a W3C traceparent:
// version-traceid-parentid-flags, lowercase hex, non-zero ids.
func validTraceparent(v string) bool {
	// 2 + 1 + 32 + 1 + 16 + 1 + 2; future versions may append fields.
	if len(v) < 55 || v[2] != '-' || v[35] != '-' || v[52] != '-' {
		return false
	}
	if len(v) > 55 && (v[:2] == "00" || v[55] != '-') {
		return false
	}
	if v[:2] == "ff" {
		return false
	}
	for _, f := range []string{v[:2], v[3:35], v[36:52], v[53:55]} {
		for i := 0; i < len(f); i++ {
			c := f[i]
			if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
				return false
			}
		}
	}
	return strings.Trim(v[3:35], "0") != "" && strings.Trim(v[36:52], "0") != ""
}
