package identity

import (
	"crypto/tls"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ALPN is HBONE's application protocol: HTTP/2.
const ALPN = "h2"

// ServerTLS returns the configuration of an HBONE listener. For each
// connection, lookup names the identity to present (typically the workload
// owning the local address the connection arrived on); the certificate is
// awaited as in Get. The client must present a certificate that chains to the
// mesh roots and carries a SPIFFE ID of the trust domain; [PeerID] reads it
// from the connection state.
func (m *Manager) ServerTLS(lookup func(hello *tls.ClientHelloInfo) (spiffeid.ID, error)) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			id, err := lookup(hello)
			if err != nil {
				return nil, fmt.Errorf("choosing server identity: %w", err)
			}
			cert, err := m.Get(hello.Context(), id)
			if err != nil {
				return nil, err
			}
			return &tls.Config{
				MinVersion:   tls.VersionTLS13,
				NextProtos:   []string{ALPN},
				Certificates: []tls.Certificate{*cert.TLS},
				// The chain is checked in VerifyConnection against the mesh
				// roots, which Go's own verification cannot take per trust domain.
				ClientAuth:       tls.RequireAnyClientCert,
				VerifyConnection: m.verifyPeer(spiffeid.MatchMemberOf(m.opts.TrustDomain)),
			}, nil
		},
	}
}

// ClientTLS returns the configuration of an HBONE connection from src: it
// presents src's certificate and accepts a server whose certificate chains to
// the mesh roots and carries one of expectedPeers. Host names play no part.
func (m *Manager) ClientTLS(src spiffeid.ID, expectedPeers []spiffeid.ID) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		// The server is checked by SPIFFE ID in VerifyConnection instead.
		InsecureSkipVerify: true,
		GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			cert, err := m.Get(cri.Context(), src)
			if err != nil {
				return nil, err
			}
			return cert.TLS, nil
		},
		VerifyConnection: m.verifyPeer(spiffeid.MatchOneOf(expectedPeers...)),
	}
}

// verifyPeer checks the peer's chain against the mesh roots and its SPIFFE
// ID against match. It runs on resumed sessions too.
func (m *Manager) verifyPeer(match spiffeid.Matcher) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("verifying peer: no certificate")
		}
		id, _, err := x509svid.Verify(cs.PeerCertificates, m.bundle.Load(), x509svid.WithTime(m.clock.Now()))
		if err != nil {
			return fmt.Errorf("verifying peer: %w", err)
		}
		if err := match(id); err != nil {
			return fmt.Errorf("verifying peer %s: %w", id, err)
		}
		return nil
	}
}

// PeerID is the SPIFFE ID of a connection's verified peer.
func PeerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("peer presented no certificate")
	}
	id, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("reading peer identity: %w", err)
	}
	return id, nil
}
