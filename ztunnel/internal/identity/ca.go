package identity

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/structpb"

	caapi "github.com/ambient-mesh/ambient/api/ca"
)

// CAPort is istiod-lite's TLS port, which serves the CA next to xDS.
const CAPort = 15012

// CAServerName is the name istiod-lite's serving certificate carries.
const CAServerName = "istiod.istio-system.svc"

// TokenAudience is the audience of the projected service-account token that
// authenticates ztunnel to the CA.
const TokenAudience = "istio-ca"

// CA signs certificate requests. impersonate is the SPIFFE ID to ask for on
// behalf of a workload, or "" for the caller's own identity. It returns the
// PEM chain, leaf first and root last.
type CA interface {
	CreateCertificate(ctx context.Context, csrPEM []byte, ttl time.Duration, impersonate string) ([]string, error)
}

// CAClient is a [CA] reached over gRPC with TLS.
type CAClient struct {
	conn   *grpc.ClientConn
	client caapi.IstioCertificateServiceClient
}

var _ CA = (*CAClient)(nil)

// NewCAClient returns a client of the CA at addr (host:port). The server
// must present a certificate for serverName that chains to roots. token
// returns the bearer token to send with each call; it is called per call so
// a rotated projected token is picked up. No connection is made until the
// first call.
func NewCAClient(addr string, roots *x509.CertPool, serverName string, token func() (string, error)) (*CAClient, error) {
	if roots == nil {
		return nil, errors.New("creating CA client: no root certificates")
	}
	if token == nil {
		return nil, errors.New("creating CA client: no token source")
	}
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
			RootCAs:    roots,
			ServerName: serverName,
			MinVersion: tls.VersionTLS12,
		})),
		grpc.WithPerRPCCredentials(bearer(token)),
	)
	if err != nil {
		return nil, fmt.Errorf("creating CA client for %s: %w", addr, err)
	}
	return &CAClient{conn: conn, client: caapi.NewIstioCertificateServiceClient(conn)}, nil
}

// CreateCertificate implements [CA]. A refusal's error wraps the gRPC status,
// so status.Code and the server's message survive.
func (c *CAClient) CreateCertificate(ctx context.Context, csrPEM []byte, ttl time.Duration, impersonate string) ([]string, error) {
	req := &caapi.IstioCertificateRequest{
		Csr:              string(csrPEM),
		ValidityDuration: int64(ttl / time.Second),
	}
	if impersonate != "" {
		req.Metadata = &structpb.Struct{Fields: map[string]*structpb.Value{
			caapi.ImpersonatedIdentityKey: structpb.NewStringValue(impersonate),
		}}
	}
	resp, err := c.client.CreateCertificate(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("creating certificate: %w", err)
	}
	if len(resp.GetCertChain()) == 0 {
		return nil, errors.New("creating certificate: CA returned an empty chain")
	}
	return resp.GetCertChain(), nil
}

// Close closes the connection to the CA.
func (c *CAClient) Close() error {
	return c.conn.Close()
}

// bearer sends "authorization: Bearer <token>" with every call, only over TLS.
type bearer func() (string, error)

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	tok, err := b()
	if err != nil {
		return nil, fmt.Errorf("reading CA token: %w", err)
	}
	return map[string]string{"authorization": "Bearer " + tok}, nil
}

func (bearer) RequireTransportSecurity() bool { return true }

// newKeyAndCSR makes a fresh ECDSA P-256 key and a CSR whose only SAN is
// id's URI, which is all the CA grants.
func newKeyAndCSR(id spiffeid.ID) (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generating key: %w", err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		URIs: []*url.URL{id.URL()},
	}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("creating CSR: %w", err)
	}
	return key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}
