package echo

import (
	"context"
	"errors"
	"io"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/ambient-mesh/ambient/e2e/internal/echopb"
)

func (s *Server) newGRPCServer() (*grpc.Server, *health.Server) {
	srv := grpc.NewServer(
		grpc.MaxRecvMsgSize(int(s.cfg.MaxSize)+grpcEnvelope),
		grpc.MaxSendMsgSize(int(s.cfg.MaxSize)+grpcEnvelope),
		grpc.ChainUnaryInterceptor(s.logUnary),
		grpc.ChainStreamInterceptor(s.logStream),
	)
	echopb.RegisterEchoServiceServer(srv, &grpcEcho{s: s})
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	return srv, hs
}

// grpcEnvelope is room for the fields around a payload of MaxSize bytes.
const grpcEnvelope = 64 << 10

func (s *Server) logUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	s.logCall(ctx, info.FullMethod, start, err)
	return resp, err
}

// logStream logs once per stream, not per message.
func (s *Server) logStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	start := time.Now()
	err := handler(srv, ss)
	s.logCall(ss.Context(), info.FullMethod, start, err)
	return err
}

func (s *Server) logCall(ctx context.Context, method string, start time.Time, err error) {
	var from string
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		from = p.Addr.String()
	}
	s.log.Info("grpc call", "method", method, "peer", from,
		"code", status.Code(err).String(), "duration", time.Since(start))
}

// grpcEcho implements echo.v1.EchoService.
type grpcEcho struct {
	echopb.UnimplementedEchoServiceServer
	s *Server
}

func (g *grpcEcho) Echo(ctx context.Context, req *echopb.EchoRequest) (*echopb.EchoResponse, error) {
	method, _ := grpc.Method(ctx)
	return g.s.answerGRPC(ctx, method, req)
}

func (g *grpcEcho) EchoStream(stream grpc.BidiStreamingServer[echopb.EchoRequest, echopb.EchoResponse]) error {
	method, _ := grpc.MethodFromServerStream(stream)
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		resp, err := g.s.answerGRPC(stream.Context(), method, req)
		if err != nil {
			return err
		}
		if err := stream.Send(resp); err != nil {
			return err
		}
	}
}

// answerGRPC applies the knobs of req and describes the call.
func (s *Server) answerGRPC(ctx context.Context, method string, req *echopb.EchoRequest) (*echopb.EchoResponse, error) {
	var delay time.Duration
	if req.GetDelay() != nil {
		if err := req.GetDelay().CheckValid(); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "delay: %v", err)
		}
		delay = req.GetDelay().AsDuration()
	}
	if delay < 0 || delay > s.cfg.MaxDelay {
		return nil, status.Errorf(codes.InvalidArgument, "delay %v is not from 0 to %v", delay, s.cfg.MaxDelay)
	}
	if size := req.GetResponseSize(); size < 0 || size > s.cfg.MaxSize {
		return nil, status.Errorf(codes.InvalidArgument, "response size %d is not from 0 to %d", size, s.cfg.MaxSize)
	}
	if delay > 0 {
		t := time.NewTimer(delay)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	if code := codes.Code(req.GetStatusCode()); code != codes.OK {
		return nil, status.Error(code, "status requested by the caller")
	}

	id := s.cfg.Identity
	resp := &echopb.EchoResponse{
		Message:      req.GetMessage(),
		Pod:          id.Pod,
		Namespace:    id.Namespace,
		PodIp:        id.PodIP,
		Hostname:     id.Hostname,
		Version:      id.Version,
		Method:       "POST", // gRPC calls are always HTTP/2 POSTs
		Path:         method,
		Proto:        "HTTP/2.0",
		Headers:      map[string]*echopb.HeaderValues{},
		RequestBytes: int64(len(req.GetPayload())),
	}
	if p, ok := peer.FromContext(ctx); ok {
		if p.Addr != nil {
			resp.PeerAddress = p.Addr.String()
		}
		if p.LocalAddr != nil {
			resp.LocalAddress = p.LocalAddr.String()
		}
	}
	md, _ := metadata.FromIncomingContext(ctx)
	for k, v := range md {
		resp.Headers[k] = &echopb.HeaderValues{Values: v}
	}
	if v := md.Get(":authority"); len(v) > 0 {
		resp.Host = v[0]
	}
	if n := req.GetResponseSize(); n > 0 {
		resp.Payload = make([]byte, n)
		for i := range resp.Payload {
			resp.Payload[i] = fillerChunk[i%len(fillerChunk)]
		}
	}
	return resp, nil
}
