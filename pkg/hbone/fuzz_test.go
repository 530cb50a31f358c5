package hbone

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"
)

// FuzzServeRequest drives the server's request validation with arbitrary
// methods, authorities and headers: it must answer 400/405 or reach the
// handler with a well-formed Request, and never panic.
func FuzzServeRequest(f *testing.F) {
	f.Add("CONNECT", "10.0.0.1:8080", `for="10.0.0.2:4711"`, "a=b", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	f.Add("CONNECT", "[fd00::1]:80", `for="[fd00::2]"`, "", "")
	f.Add("CONNECT", "[::ffff:1.2.3.4]:1", "for=1.2.3.4;proto=https, for=5.6.7.8", "", "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	f.Add("GET", "example.com:80", "for=unknown", "", "")
	f.Add("CONNECT", "[fe80::1%eth0]:80", `for="\"[::1]:2\""`, "", "00-00000000000000000000000000000000-b7ad6b7169203331-01")
	f.Add("CONNECT", "1.2.3.4:0", "", "", "")
	s := NewServer(&tls.Config{}, func(_ context.Context, req *Request) (net.Conn, int) {
		return nil, http.StatusUnauthorized
	}, ServerOptions{Logger: slog.New(slog.DiscardHandler)})
	defer s.Close()
	f.Fuzz(func(t *testing.T, method, authority, forwarded, baggage, traceparent string) {
		h := http.Header{}
		h.Set(headerForwarded, forwarded)
		h.Set(headerBaggage, baggage)
		h.Set(headerTraceparent, traceparent)

		req, code := validateRequest(method, authority, h)
		switch {
		case method != http.MethodConnect:
			if code != http.StatusMethodNotAllowed {
				t.Fatalf("method %q answered %d, want 405", method, code)
			}
		case code != 0:
			if code != http.StatusBadRequest {
				t.Fatalf("authority %q answered %d, want 400", authority, code)
			}
			if _, err := netip.ParseAddrPort(authority); err == nil {
				if ap, _ := netip.ParseAddrPort(authority); ap.Port() != 0 && ap.Addr().Zone() == "" {
					t.Fatalf("valid authority %q refused", authority)
				}
			}
		default:
			checkRequest(t, req, authority, baggage, traceparent)
		}

		// The same through ServeHTTP, as the HTTP/2 server calls it.
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.Method, r.Host, r.Header = method, authority, h
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)
		want := code
		if want == 0 {
			want = http.StatusUnauthorized // the handler's answer
		}
		if w.Code != want {
			t.Fatalf("ServeHTTP answered %d, want %d", w.Code, want)
		}
	})
}

func checkRequest(t *testing.T, req *Request, authority, baggage, traceparent string) {
	t.Helper()
	if req.Authority != authority {
		t.Fatalf("Authority = %q, want %q", req.Authority, authority)
	}
	if !req.Addr.IsValid() || req.Addr.Port() == 0 || req.Addr.Addr().Zone() != "" || req.Addr.Addr().Is4In6() {
		t.Fatalf("accepted %q as %v", authority, req.Addr)
	}
	if again, err := parseAuthority(req.Addr.String()); err != nil || again != req.Addr {
		t.Fatalf("Addr %v does not round-trip: %v, %v", req.Addr, again, err)
	}
	if len(req.Baggage) > maxBaggageLen || (req.Baggage != "" && req.Baggage != baggage) {
		t.Fatalf("Baggage = %q from %q", req.Baggage, baggage)
	}
	if req.Traceparent != "" && (req.Traceparent != traceparent || !validTraceparent(traceparent)) {
		t.Fatalf("Traceparent = %q from %q", req.Traceparent, traceparent)
	}
}

// FuzzForwardedRoundTrip checks that what a Pool sends, a Server reads back.
func FuzzForwardedRoundTrip(f *testing.F) {
	f.Add([]byte{10, 0, 0, 1}, uint16(4711))
	f.Add([]byte{0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, uint16(0))
	f.Fuzz(func(t *testing.T, ip []byte, port uint16) {
		a, ok := netip.AddrFromSlice(ip)
		if !ok {
			return
		}
		ap := netip.AddrPortFrom(a, port)
		got, ok := parseForwardedFor(formatForwarded(ap))
		if !ok || got != ap {
			t.Fatalf("forwarded %q parsed as %v, %v; want %v", formatForwarded(ap), got, ok, ap)
		}
	})
}
