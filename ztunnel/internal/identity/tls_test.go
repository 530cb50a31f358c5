package identity

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// newMeshManager returns a Manager on the system clock with its own fake CA.
func newMeshManager(t *testing.T, ca *fakeCA, td string) *Manager {
	t.Helper()
	m := NewManager(ca.client(t, testToken), Options{
		TrustDomain: spiffeid.RequireTrustDomainFromString(td),
		WaitTimeout: testWait,
		Log:         quiet,
	})
	t.Cleanup(m.Close)
	return m
}

// presenting is a client configuration that shows id's certificate from m
// and trusts any server, for checking what a server accepts.
func presenting(t *testing.T, m *Manager, id spiffeid.ID) *tls.Config {
	t.Helper()
	conf := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{ALPN}, InsecureSkipVerify: true}
	if !id.IsZero() {
		conf.Certificates = []tls.Certificate{*mustGet(t, m, id).TLS}
	}
	return conf
}

type handshakeResult struct {
	server, client       tls.ConnectionState
	serverErr, clientErr error
}

// handshake runs TLS between the two configurations over loopback TCP and
// exchanges a byte, so a refusal by the server after the client's last
// flight still reaches the client.
func handshake(t *testing.T, server, client *tls.Config) handshakeResult {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()

	var res handshakeResult
	done := make(chan struct{})
	go func() {
		defer close(done)
		raw, err := ln.Accept()
		if err != nil {
			res.serverErr = err
			return
		}
		conn := tls.Server(raw, server)
		defer conn.Close()
		if res.serverErr = conn.HandshakeContext(ctx); res.serverErr != nil {
			return
		}
		res.server = conn.ConnectionState()
		_, res.serverErr = conn.Write([]byte{1})
	}()

	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	conn := tls.Client(raw, client)
	defer conn.Close()
	if res.clientErr = conn.HandshakeContext(ctx); res.clientErr == nil {
		res.client = conn.ConnectionState()
		_, res.clientErr = conn.Read(make([]byte, 1))
	}
	conn.Close()
	<-done
	return res
}

func TestHBONEHandshake(t *testing.T) {
	ca := newFakeCA(t, realClock{})
	m := newMeshManager(t, ca, "cluster.local")
	// A second mesh under another root, and one in another trust domain
	// under the same root.
	otherRoot := newMeshManager(t, newFakeCA(t, realClock{}), "cluster.local")
	otherDomain := newMeshManager(t, ca, "evil.example")

	serveAs := func(m *Manager, id spiffeid.ID) *tls.Config {
		return m.ServerTLS(func(hello *tls.ClientHelloInfo) (spiffeid.ID, error) {
			if hello.Conn == nil || hello.Conn.LocalAddr() == nil {
				return spiffeid.ID{}, errors.New("no local address")
			}
			return id, nil
		})
	}
	tests := []struct {
		name                   string
		server, client         *tls.Config
		wantServerErr, wantErr bool
		// reason is in the refusing side's error.
		reason string
	}{
		{"a client expecting the server's identity connects", serveAs(m, idB), m.ClientTLS(idA, []spiffeid.ID{idC, idB}), false, false, ""},
		{"a client expecting another identity refuses the server", serveAs(m, idB), m.ClientTLS(idA, []spiffeid.ID{idC}), true, true, "unexpected ID"},
		{"a client refuses a server under another root", serveAs(otherRoot, idB), m.ClientTLS(idA, []spiffeid.ID{idB}), true, true, "unknown authority"},
		{"a server refuses a client from another trust domain", serveAs(m, idB), presenting(t, otherDomain, foreignID), true, true, `trust domain: "evil.example"`},
		{"a server refuses a client under another root", serveAs(m, idB), presenting(t, otherRoot, idA), true, true, "unknown authority"},
		{"a server refuses a client without a certificate", serveAs(m, idB), presenting(t, m, spiffeid.ID{}), true, true, "didn't provide a certificate"},
		{"a server with no identity for the connection refuses it", m.ServerTLS(func(*tls.ClientHelloInfo) (spiffeid.ID, error) {
			return spiffeid.ID{}, errors.New("no workload at this address")
		}), m.ClientTLS(idA, []spiffeid.ID{idB}), true, true, "no workload at this address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := handshake(t, tt.server, tt.client)
			if (res.serverErr != nil) != tt.wantServerErr || (res.clientErr != nil) != tt.wantErr {
				t.Fatalf("server error %v, client error %v; want errors: server %v, client %v",
					res.serverErr, res.clientErr, tt.wantServerErr, tt.wantErr)
			}
			if tt.wantErr {
				if !strings.Contains(fmt.Sprint(res.serverErr, res.clientErr), tt.reason) {
					t.Errorf("server error %v, client error %v; want one to say %q", res.serverErr, res.clientErr, tt.reason)
				}
				return
			}
			if got, err := PeerID(res.server); err != nil || got != idA {
				t.Errorf("server sees peer %v (%v), want %s", got, err, idA)
			}
			if got, err := PeerID(res.client); err != nil || got != idB {
				t.Errorf("client sees peer %v (%v), want %s", got, err, idB)
			}
			if res.client.Version != tls.VersionTLS13 || res.client.NegotiatedProtocol != ALPN {
				t.Errorf("negotiated version %x protocol %q, want TLS 1.3 and %q", res.client.Version, res.client.NegotiatedProtocol, ALPN)
			}
		})
	}
}

func TestServerPresentsTheCertificateOfTheAddressConnectedTo(t *testing.T) {
	ca := newFakeCA(t, realClock{})
	m := newMeshManager(t, ca, "cluster.local")
	// Two listeners stand for two workloads; lookup maps the local address
	// to the workload that owns it.
	lnB, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lnB.Close()
	owners := map[string]spiffeid.ID{lnB.Addr().String(): idB}
	server := m.ServerTLS(func(hello *tls.ClientHelloInfo) (spiffeid.ID, error) {
		id, ok := owners[hello.Conn.LocalAddr().String()]
		if !ok {
			return spiffeid.ID{}, errors.New("no workload at this address")
		}
		return id, nil
	})
	go func() {
		raw, err := lnB.Accept()
		if err != nil {
			return
		}
		conn := tls.Server(raw, server)
		defer conn.Close()
		if conn.HandshakeContext(t.Context()) == nil {
			conn.Write([]byte{1})
		}
	}()
	raw, err := net.Dial("tcp", lnB.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	conn := tls.Client(raw, m.ClientTLS(idA, []spiffeid.ID{idB}))
	defer conn.Close()
	if err := conn.HandshakeContext(t.Context()); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if got, _ := PeerID(conn.ConnectionState()); got != idB {
		t.Errorf("server presented %s, want %s", got, idB)
	}
}
