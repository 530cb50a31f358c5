package ca

import (
	"context"
	"testing"

	"google.golang.org/grpc/metadata"

	caapi "github.com/ambient-mesh/ambient/api/ca"
)

// BenchmarkCreateCertificate measures one request in process: cached
// authentication, impersonation check, CSR verification and signing.
func BenchmarkCreateCertificate(b *testing.B) {
	env := newTestService(b)
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer "+tokZtunnel))
	req := &caapi.IstioCertificateRequest{Csr: string(newCSR(b, sleepID)), Metadata: impersonate(sleepID)}
	if _, err := env.svc.CreateCertificate(ctx, req); err != nil { // warms the token cache
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := env.svc.CreateCertificate(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCreateCertificateGRPC is the same request through a real gRPC
// client and server over TLS on loopback.
func BenchmarkCreateCertificateGRPC(b *testing.B) {
	env := newTestEnv(b)
	ctx := withToken(tokZtunnel)
	req := &caapi.IstioCertificateRequest{Csr: string(newCSR(b, sleepID)), Metadata: impersonate(sleepID)}
	if _, err := env.client.CreateCertificate(ctx, req); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := env.client.CreateCertificate(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}
