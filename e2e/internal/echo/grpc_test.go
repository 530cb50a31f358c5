package echo

import (
	"context"
	"errors"
	"io"
	"net"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/ambient-mesh/ambient/e2e/internal/echopb"
)

// dialGRPC connects to addr and returns the client's local address source.
func dialGRPC(t *testing.T, addr string) (*grpc.ClientConn, *recordingDialer) {
	t.Helper()
	dialer := &recordingDialer{}
	conn, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) {
			return dialer.DialContext(ctx, "tcp", a)
		}),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn, dialer
}

func TestGRPCEcho(t *testing.T) {
	s := startServer(t)
	addr := s.GRPCAddrs()[0]
	conn, dialer := dialGRPC(t, addr)
	client := echopb.NewEchoServiceClient(conn)

	tests := []struct {
		name     string
		req      *echopb.EchoRequest
		md       metadata.MD
		wantCode codes.Code
		check    func(t *testing.T, r Reply, resp *echopb.EchoResponse)
	}{
		{
			name: "Echo is answered with the workload, both addresses, the method and the metadata",
			req:  &echopb.EchoRequest{Message: "hi"},
			md:   metadata.Pairs("x-test", "one", "x-test", "two"),
			check: func(t *testing.T, r Reply, _ *echopb.EchoResponse) {
				compareReply(t, r, Reply{
					Pod: testIdentity.Pod, Namespace: testIdentity.Namespace, PodIP: testIdentity.PodIP,
					Hostname: testIdentity.Hostname, Version: testIdentity.Version,
					LocalAddress: addr, PeerAddress: dialer.Local(), Host: addr,
					Method: "POST", Path: echopb.EchoService_Echo_FullMethodName, Proto: "HTTP/2.0",
					Message: "hi",
				})
				if got := r.Headers["x-test"]; !slices.Equal(got, []string{"one", "two"}) {
					t.Errorf("x-test metadata %q, want [one two]", got)
				}
			},
		},
		{
			name: "the payload is counted in request_bytes",
			req:  &echopb.EchoRequest{Payload: make([]byte, 100)},
			check: func(t *testing.T, r Reply, _ *echopb.EchoResponse) {
				if r.RequestBytes != 100 {
					t.Errorf("request_bytes %d, want 100", r.RequestBytes)
				}
			},
		},
		{
			name: "response_size is answered with that many payload bytes",
			req:  &echopb.EchoRequest{ResponseSize: 70000},
			check: func(t *testing.T, _ Reply, resp *echopb.EchoResponse) {
				if len(resp.GetPayload()) != 70000 {
					t.Errorf("payload is %d bytes, want 70000", len(resp.GetPayload()))
				}
			},
		},
		{
			name: "a delay within the bound is waited out",
			req:  &echopb.EchoRequest{Delay: durationpb.New(5 * time.Millisecond)},
		},
		{
			name:     "a status code fails the call with that code",
			req:      &echopb.EchoRequest{StatusCode: int32(codes.PermissionDenied)},
			wantCode: codes.PermissionDenied,
		},
		{
			name:     "a delay beyond the bound is refused",
			req:      &echopb.EchoRequest{Delay: durationpb.New(time.Hour)},
			wantCode: codes.InvalidArgument,
		},
		{
			name:     "a response size beyond the bound is refused",
			req:      &echopb.EchoRequest{ResponseSize: 2 << 20},
			wantCode: codes.InvalidArgument,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := t.Context()
			if tt.md != nil {
				ctx = metadata.NewOutgoingContext(ctx, tt.md)
			}
			resp, err := client.Echo(ctx, tt.req)
			if code := status.Code(err); code != tt.wantCode {
				t.Fatalf("Echo: %v, want code %v", err, tt.wantCode)
			}
			if err == nil && tt.check != nil {
				tt.check(t, ReplyFromProto(resp), resp)
			}
		})
	}
}

func TestGRPCEchoStreamAnswersEveryMessageOnOneStream(t *testing.T) {
	s := startServer(t)
	conn, dialer := dialGRPC(t, s.GRPCAddrs()[0])
	stream, err := echopb.NewEchoServiceClient(conn).EchoStream(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	sent := []string{"one", "two", "three"}
	for _, m := range sent {
		if err := stream.Send(&echopb.EchoRequest{Message: m}); err != nil {
			t.Fatalf("Send: %v", err)
		}
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("Recv: %v", err)
		}
		if resp.GetPeerAddress() != dialer.Local() || resp.GetPath() != echopb.EchoService_EchoStream_FullMethodName {
			t.Errorf("reply peer %q path %q, want %q %q", resp.GetPeerAddress(), resp.GetPath(),
				dialer.Local(), echopb.EchoService_EchoStream_FullMethodName)
		}
		got = append(got, resp.GetMessage())
	}
	if !slices.Equal(got, sent) {
		t.Errorf("answered %q, want %q", got, sent)
	}
}

func TestGRPCHealthReportsServing(t *testing.T) {
	s := startServer(t)
	conn, _ := dialGRPC(t, s.GRPCAddrs()[0])
	resp, err := healthpb.NewHealthClient(conn).Check(t.Context(), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health %v, want SERVING", resp.GetStatus())
	}
}
