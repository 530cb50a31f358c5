package xds

import (
	"context"

	"google.golang.org/grpc"
)

// DeltaAggregatedResourcesMethod is the gRPC method path of delta ADS. It
// names envoy's service, whatever this package's protobuf package is: the
// path is what servers route on.
const DeltaAggregatedResourcesMethod = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"

// deltaStreamDesc describes the method as protoc-gen-go-grpc would: a
// bidirectional stream.
var deltaStreamDesc = grpc.StreamDesc{
	StreamName:    "DeltaAggregatedResources",
	ClientStreams: true,
	ServerStreams: true,
}

// DeltaStream is the client side of a delta ADS stream.
type DeltaStream = grpc.BidiStreamingClient[DeltaDiscoveryRequest, DeltaDiscoveryResponse]

// OpenDeltaStream opens a delta ADS stream on cc. It is what a generated
// AggregatedDiscoveryServiceClient's DeltaAggregatedResources does, without
// the generated service (whose protobuf package would have to be envoy's).
func OpenDeltaStream(ctx context.Context, cc grpc.ClientConnInterface, opts ...grpc.CallOption) (DeltaStream, error) {
	s, err := cc.NewStream(ctx, &deltaStreamDesc, DeltaAggregatedResourcesMethod, opts...)
	if err != nil {
		return nil, err
	}
	return &grpc.GenericClientStream[DeltaDiscoveryRequest, DeltaDiscoveryResponse]{ClientStream: s}, nil
}
