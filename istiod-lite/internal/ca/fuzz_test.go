package ca

import (
	"context"
	"log/slog"
	"testing"

	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	caapi "github.com/ambient-mesh/ambient/api/ca"
)

// FuzzCreateCertificate throws arbitrary CSRs, impersonation targets and
// validities at the request validation path. Whatever comes in, the service
// must not panic, must answer with a status error or a certificate, and any
// certificate it issues must carry exactly an identity the caller may have.
func FuzzCreateCertificate(f *testing.F) {
	env := newTestService(f)
	env.svc.Log = slog.New(slog.DiscardHandler) // millions of refusals
	f.Add(true, string(newCSR(f, sleepID)), "", int64(0))
	f.Add(true, string(newCSR(f, httpbinID)), sleepID, int64(3600))
	f.Add(false, string(newCSR(f, sleepID)), "", int64(-1))
	f.Add(true, string(newCSR(f, sleepID)), sleepID, int64(1<<62))
	f.Add(true, string(newCSR(f, sleepID, httpbinID)), "spiffe://cluster.local/ns/default", int64(60))
	f.Add(true, "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n", "spiffe://", int64(1))

	f.Fuzz(func(t *testing.T, asZtunnel bool, csr, impersonated string, validity int64) {
		tok, own := tokSleep, sleepID
		if asZtunnel {
			tok, own = tokZtunnel, ztunnelID
		}
		ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer "+tok))
		req := &caapi.IstioCertificateRequest{Csr: csr, ValidityDuration: validity}
		if impersonated != "" {
			req.Metadata = impersonate(impersonated)
		}
		resp, err := env.svc.CreateCertificate(ctx, req)
		if err != nil {
			if _, ok := status.FromError(err); !ok {
				t.Fatalf("error is not a gRPC status: %v", err)
			}
			return
		}
		want := own
		if impersonated != "" {
			want = impersonated
		}
		leaf := verifyLeaf(t, resp.CertChain, env.ca.RootPEM(), want)
		if want != own && !asZtunnel {
			t.Fatalf("a workload obtained %s", leaf.URIs[0])
		}
		if want != own && want != sleepID && want != "spiffe://cluster.local/ns/default/sa/starting" {
			t.Fatalf("ztunnel on node-1 obtained %s, which runs no pod there", leaf.URIs[0])
		}
	})
}
