package api_test

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/ambient-mesh/ambient/api/ca"
	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/ambient-mesh/ambient/api/xds"
	"github.com/ambient-mesh/ambient/api/zds"
)

// The expected bytes below are written out by hand from the protobuf
// encoding rules (tag = field_number<<3 | wire_type) and the field numbers of
// Istio's protocols, so renumbering a field or changing its type fails here.
func TestMessagesEncodeToIstioWireBytes(t *testing.T) {
	tests := []struct {
		name string
		msg  proto.Message
		want []byte
	}{
		{
			name: "an Address holding a Workload uses field 1 and Workload.uid is field 20",
			msg:  &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{Uid: "u"}}},
			want: []byte{0x0a, 0x04, 0xa2, 0x01, 0x01, 'u'},
		},
		{
			name: "an Address holding a Service uses field 2 and Service.hostname is field 3",
			msg:  &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{Hostname: "h"}}},
			want: []byte{0x12, 0x03, 0x1a, 0x01, 'h'},
		},
		{
			name: "Workload name, namespace and addresses are fields 1, 2 and 3",
			msg:  &workloadapi.Workload{Name: "n", Namespace: "s", Addresses: [][]byte{{10, 0, 0, 1}}},
			want: []byte{0x0a, 0x01, 'n', 0x12, 0x01, 's', 0x1a, 0x04, 10, 0, 0, 1},
		},
		{
			name: "Workload tunnel_protocol HBONE is field 5 with value 1",
			msg:  &workloadapi.Workload{TunnelProtocol: workloadapi.TunnelProtocol_HBONE},
			want: []byte{0x28, 0x01},
		},
		{
			name: "Workload service_account is field 7 and node is field 9",
			msg:  &workloadapi.Workload{ServiceAccount: "a", Node: "b"},
			want: []byte{0x3a, 0x01, 'a', 0x4a, 0x01, 'b'},
		},
		{
			name: "Workload services is map field 22 of PortList",
			msg: &workloadapi.Workload{Services: map[string]*workloadapi.PortList{
				"ns/h": {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}},
			}},
			want: []byte{
				0xb2, 0x01, 0x0f, // field 22, 15 bytes of map entry
				0x0a, 0x04, 'n', 's', '/', 'h', // key
				0x12, 0x07, 0x0a, 0x05, 0x08, 0x50, 0x10, 0x90, 0x3f, // value: ports[0] {80, 8080}
			},
		},
		{
			name: "Workload authorization_policies is field 16 and status UNHEALTHY is field 17 value 1",
			msg:  &workloadapi.Workload{AuthorizationPolicies: []string{"p"}, Status: workloadapi.WorkloadStatus_UNHEALTHY},
			want: []byte{0x82, 0x01, 0x01, 'p', 0x88, 0x01, 0x01},
		},
		{
			name: "Workload capacity is wrapper field 27",
			msg:  &workloadapi.Workload{Capacity: wrapperspb.UInt32(3)},
			want: []byte{0xda, 0x01, 0x02, 0x08, 0x03},
		},
		{
			name: "Service waypoint is field 7 with an address oneof at 2 and hbone_mtls_port at 3",
			msg: &workloadapi.Service{Waypoint: &workloadapi.GatewayAddress{
				Destination:   &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: []byte{10, 0, 0, 9}}},
				HboneMtlsPort: 15008,
			}},
			// Go writes oneof members after the other fields.
			want: []byte{0x3a, 0x0b, 0x18, 0xa0, 0x75, 0x12, 0x06, 0x12, 0x04, 10, 0, 0, 9},
		},
		{
			name: "Service canonical is field 11",
			msg:  &workloadapi.Service{Canonical: true},
			want: []byte{0x58, 0x01},
		},
		{
			name: "Authorization rules are field 5, clauses 1, matches 2 and destination_ports packed field 9",
			msg: &security.Authorization{
				Name:   "a",
				Action: security.Action_DENY,
				Rules:  []*security.Rule{{Clauses: []*security.Clause{{Matches: []*security.Match{{DestinationPorts: []uint32{80}}}}}}},
			},
			want: []byte{0x0a, 0x01, 'a', 0x20, 0x01, 0x2a, 0x07, 0x0a, 0x05, 0x12, 0x03, 0x4a, 0x01, 0x50},
		},
		{
			name: "Authorization dry_run is bool field 6, written after rules",
			msg: &security.Authorization{
				Name:   "a",
				Rules:  []*security.Rule{{}},
				DryRun: true,
			},
			want: []byte{0x0a, 0x01, 'a', 0x2a, 0x00, 0x30, 0x01},
		},
		{
			name: "StringMatch presence is field 4",
			msg:  &security.StringMatch{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}},
			want: []byte{0x22, 0x00},
		},
		{
			name: "ZdsHello version V1 is field 1 value 1",
			msg:  &zds.ZdsHello{Version: zds.Version_V1},
			want: []byte{0x08, 0x01},
		},
		{
			name: "a WorkloadRequest add is field 1 with uid 1 and workload_info 2",
			msg: &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Add{Add: &zds.AddWorkload{
				Uid: "u", WorkloadInfo: &zds.WorkloadInfo{Name: "p", Namespace: "n", ServiceAccount: "s"},
			}}},
			want: []byte{0x0a, 0x0e, 0x0a, 0x01, 'u', 0x12, 0x09, 0x0a, 0x01, 'p', 0x12, 0x01, 'n', 0x1a, 0x01, 's'},
		},
		{
			name: "a WorkloadRequest del is field 2 and DelWorkload.uid is field 2",
			msg:  &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Del{Del: &zds.DelWorkload{Uid: "u"}}},
			want: []byte{0x12, 0x03, 0x12, 0x01, 'u'},
		},
		{
			name: "a WorkloadRequest snapshot_sent is field 3",
			msg:  &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_SnapshotSent{SnapshotSent: &zds.SnapshotSent{}}},
			want: []byte{0x1a, 0x00},
		},
		{
			name: "a WorkloadRequest keep is field 5",
			msg:  &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Keep{Keep: &zds.KeepWorkload{Uid: "u"}}},
			want: []byte{0x2a, 0x03, 0x0a, 0x01, 'u'},
		},
		{
			name: "a WorkloadResponse ack is field 1 with error at 1",
			msg:  &zds.WorkloadResponse{Payload: &zds.WorkloadResponse_Ack{Ack: &zds.Ack{Error: "e"}}},
			want: []byte{0x0a, 0x03, 0x0a, 0x01, 'e'},
		},
		{
			name: "IstioCertificateRequest csr is field 1 and validity_duration is field 3",
			msg:  &ca.IstioCertificateRequest{Csr: "c", ValidityDuration: 3600},
			want: []byte{0x0a, 0x01, 'c', 0x18, 0x90, 0x1c},
		},
		{
			name: "IstioCertificateRequest metadata is Struct field 4",
			msg: &ca.IstioCertificateRequest{Metadata: &structpb.Struct{Fields: map[string]*structpb.Value{
				"k": structpb.NewStringValue("v"),
			}}},
			want: []byte{0x22, 0x0a, 0x0a, 0x08, 0x0a, 0x01, 'k', 0x12, 0x03, 0x1a, 0x01, 'v'},
		},
		{
			name: "IstioCertificateResponse cert_chain is repeated field 1",
			msg:  &ca.IstioCertificateResponse{CertChain: []string{"a", "b"}},
			want: []byte{0x0a, 0x01, 'a', 0x0a, 0x01, 'b'},
		},
		{
			name: "DeltaDiscoveryRequest node is field 1 (Node.id field 1) and type_url is field 2",
			msg:  &xds.DeltaDiscoveryRequest{Node: &xds.Node{Id: "i"}, TypeUrl: "t"},
			want: []byte{0x0a, 0x03, 0x0a, 0x01, 'i', 0x12, 0x01, 't'},
		},
		{
			name: "DeltaDiscoveryRequest resource_names_subscribe and _unsubscribe are repeated fields 3 and 4",
			msg:  &xds.DeltaDiscoveryRequest{ResourceNamesSubscribe: []string{"*"}, ResourceNamesUnsubscribe: []string{"x"}},
			want: []byte{0x1a, 0x01, '*', 0x22, 0x01, 'x'},
		},
		{
			name: "DeltaDiscoveryRequest initial_resource_versions is map field 5",
			msg:  &xds.DeltaDiscoveryRequest{InitialResourceVersions: map[string]string{"r": "v"}},
			want: []byte{0x2a, 0x06, 0x0a, 0x01, 'r', 0x12, 0x01, 'v'},
		},
		{
			name: "DeltaDiscoveryRequest response_nonce is field 6 and error_detail field 7 holds code 1 and message 2",
			msg:  &xds.DeltaDiscoveryRequest{ResponseNonce: "n", ErrorDetail: &xds.Status{Code: 3, Message: "m"}},
			want: []byte{0x32, 0x01, 'n', 0x3a, 0x05, 0x08, 0x03, 0x12, 0x01, 'm'},
		},
		{
			name: "DeltaDiscoveryResponse system_version_info, type_url, nonce and removed_resources are fields 1, 4, 5 and 6",
			msg:  &xds.DeltaDiscoveryResponse{SystemVersionInfo: "s", TypeUrl: "t", Nonce: "n", RemovedResources: []string{"r"}},
			want: []byte{0x0a, 0x01, 's', 0x22, 0x01, 't', 0x2a, 0x01, 'n', 0x32, 0x01, 'r'},
		},
		{
			name: "DeltaDiscoveryResponse resources is repeated field 2",
			msg:  &xds.DeltaDiscoveryResponse{Resources: []*xds.Resource{{Name: "a"}}},
			want: []byte{0x12, 0x03, 0x1a, 0x01, 'a'},
		},
		{
			name: "Resource version, resource (Any) and name are fields 1, 2 and 3",
			msg:  &xds.Resource{Version: "v", Resource: &anypb.Any{TypeUrl: "u", Value: []byte{1}}, Name: "a"},
			want: []byte{0x0a, 0x01, 'v', 0x12, 0x06, 0x0a, 0x01, 'u', 0x12, 0x01, 0x01, 0x1a, 0x01, 'a'},
		},
		{
			name: "Node id, cluster and metadata (Struct) are fields 1, 2 and 3",
			msg: &xds.Node{Id: "i", Cluster: "c", Metadata: &structpb.Struct{Fields: map[string]*structpb.Value{
				"k": structpb.NewStringValue("v"),
			}}},
			want: []byte{0x0a, 0x01, 'i', 0x12, 0x01, 'c', 0x1a, 0x0a, 0x0a, 0x08, 0x0a, 0x01, 'k', 0x12, 0x03, 0x1a, 0x01, 'v'},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := proto.MarshalOptions{Deterministic: true}.Marshal(tt.msg)
			if err != nil {
				t.Fatalf("marshal: %v", err)
			}
			if !bytes.Equal(got, tt.want) {
				t.Errorf("encoded\n got % x\nwant % x", got, tt.want)
			}
			back := tt.msg.ProtoReflect().Type().New().Interface()
			if err := proto.Unmarshal(tt.want, back); err != nil {
				t.Fatalf("unmarshal: %v", err)
			}
			if !proto.Equal(back, tt.msg) {
				t.Errorf("decoding the expected bytes gave %v, want %v", back, tt.msg)
			}
		})
	}
}

// The names below appear on the wire: in xDS type URLs and gRPC paths.
func TestWireNamesMatchIstio(t *testing.T) {
	tests := []struct {
		name string
		got  string
		want string
	}{
		{"the Address type URL names istio.workload.Address", workloadapi.AddressTypeURL,
			"type.googleapis.com/" + string((&workloadapi.Address{}).ProtoReflect().Descriptor().FullName())},
		{"the Address message is istio.workload.Address", fullName(&workloadapi.Address{}), "istio.workload.Address"},
		{"the Authorization type URL names istio.security.Authorization", security.AuthorizationTypeURL,
			"type.googleapis.com/" + fullName(&security.Authorization{})},
		{"the Authorization message is istio.security.Authorization", fullName(&security.Authorization{}), "istio.security.Authorization"},
		{"the ZDS request is istio.workload.zds.WorkloadRequest", fullName(&zds.WorkloadRequest{}), "istio.workload.zds.WorkloadRequest"},
		{"the CA method path is Istio's", ca.IstioCertificateService_CreateCertificate_FullMethodName,
			"/istio.v1.auth.IstioCertificateService/CreateCertificate"},
		{"the CA request is istio.v1.auth.IstioCertificateRequest", fullName(&ca.IstioCertificateRequest{}), "istio.v1.auth.IstioCertificateRequest"},
		{"the delta ADS method path is envoy's", xds.DeltaAggregatedResourcesMethod,
			"/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.got != tt.want {
				t.Errorf("got %q, want %q", tt.got, tt.want)
			}
		})
	}
}

// Enum numbers are on the wire too; these are the ones peers branch on.
func TestEnumNumbersMatchIstio(t *testing.T) {
	tests := []struct {
		name string
		got  protoreflect.EnumNumber
		want protoreflect.EnumNumber
	}{
		{"TunnelProtocol HBONE is 1", workloadapi.TunnelProtocol_HBONE.Number(), 1},
		{"WorkloadStatus UNHEALTHY is 1", workloadapi.WorkloadStatus_UNHEALTHY.Number(), 1},
		{"WorkloadType POD is 2", workloadapi.WorkloadType_POD.Number(), 2},
		{"NetworkMode HOST_NETWORK is 1", workloadapi.NetworkMode_HOST_NETWORK.Number(), 1},
		{"LoadBalancing mode PASSTHROUGH is 3", workloadapi.LoadBalancing_PASSTHROUGH.Number(), 3},
		{"LoadBalancing scope NETWORK is 6", workloadapi.LoadBalancing_NETWORK.Number(), 6},
		{"IPFamilies DUAL is 3", workloadapi.IPFamilies_DUAL.Number(), 3},
		{"ApplicationTunnel PROXY is 1", workloadapi.ApplicationTunnel_PROXY.Number(), 1},
		{"Scope WORKLOAD_SELECTOR is 2", security.Scope_WORKLOAD_SELECTOR.Number(), 2},
		{"Action DENY is 1", security.Action_DENY.Number(), 1},
		{"ZDS Version V1 is 1", zds.Version_V1.Number(), 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.got != tt.want {
				t.Errorf("got %d, want %d", tt.got, tt.want)
			}
		})
	}
}

func fullName(m proto.Message) string {
	return string(m.ProtoReflect().Descriptor().FullName())
}
