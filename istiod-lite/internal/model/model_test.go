package model

import (
	"fmt"
	"math/rand"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	securityapi "istio.io/api/security/v1beta1"
	typeapi "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
)

func TestPodBecomingReadyTurnsWorkloadHealthy(t *testing.T) {
	in := loadInputs(t, "testdata/workloads.yaml")
	var web *corev1.Pod
	for _, p := range in.Pods {
		if p.Name == "web-0" {
			web = p
		}
	}
	uid := PodUID(DefaultCluster(), "shop", "web-0")
	before := Compute(DefaultCluster(), in).Addresses[uid].GetWorkload()
	if got := before.GetStatus(); got != workloadapi.WorkloadStatus_UNHEALTHY {
		t.Fatalf("before Ready: status %v, want UNHEALTHY", got)
	}
	web.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	web.Annotations = map[string]string{AnnotationRedirection: RedirectionEnabled}
	after := Compute(DefaultCluster(), in).Addresses[uid].GetWorkload()
	if after.GetStatus() != workloadapi.WorkloadStatus_HEALTHY || after.GetTunnelProtocol() != workloadapi.TunnelProtocol_HBONE {
		t.Fatalf("after Ready and redirection: status %v tunnel %v, want HEALTHY HBONE", after.GetStatus(), after.GetTunnelProtocol())
	}
}

func TestComputeIgnoresInputOrder(t *testing.T) {
	in := syntheticInputs(200, 20, 4, 10)
	want := Compute(DefaultCluster(), in)
	r := rand.New(rand.NewSource(1))
	for i := 0; i < 5; i++ {
		r.Shuffle(len(in.Pods), func(a, b int) { in.Pods[a], in.Pods[b] = in.Pods[b], in.Pods[a] })
		r.Shuffle(len(in.Services), func(a, b int) { in.Services[a], in.Services[b] = in.Services[b], in.Services[a] })
		r.Shuffle(len(in.AuthorizationPolicies), func(a, b int) {
			in.AuthorizationPolicies[a], in.AuthorizationPolicies[b] = in.AuthorizationPolicies[b], in.AuthorizationPolicies[a]
		})
		got := Compute(DefaultCluster(), in)
		if len(got.Addresses) != len(want.Addresses) || len(got.Authorizations) != len(want.Authorizations) {
			t.Fatalf("resource counts changed with input order")
		}
		for k, v := range want.Addresses {
			a, _ := proto.MarshalOptions{Deterministic: true}.Marshal(v)
			b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(got.Addresses[k])
			if string(a) != string(b) {
				t.Fatalf("address %s changed with input order", k)
			}
		}
	}
}

// BenchmarkCompute recomputes a mid-sized cluster: 1,000 pods, 100
// services, 10 nodes, 50 policies.
func BenchmarkCompute(b *testing.B) {
	in := syntheticInputs(1000, 100, 10, 50)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		Compute(DefaultCluster(), in)
	}
}

func syntheticInputs(pods, services, nodes, policies int) Inputs {
	var in Inputs
	const namespaces = 10
	for n := 0; n < namespaces; n++ {
		in.Namespaces = append(in.Namespaces, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
			Name: fmt.Sprintf("ns-%d", n), Labels: map[string]string{"istio.io/dataplane-mode": "ambient"},
		}})
	}
	for n := 0; n < nodes; n++ {
		in.Nodes = append(in.Nodes, &corev1.Node{ObjectMeta: metav1.ObjectMeta{
			Name: fmt.Sprintf("node-%d", n), Labels: map[string]string{labelRegion: "r1", labelZone: fmt.Sprintf("z%d", n%3)},
		}})
	}
	for s := 0; s < services; s++ {
		in.Services = append(in.Services, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("svc-%d", s), Namespace: fmt.Sprintf("ns-%d", s%namespaces)},
			Spec: corev1.ServiceSpec{
				Selector:  map[string]string{"app": fmt.Sprintf("app-%d", s)},
				ClusterIP: fmt.Sprintf("10.96.%d.%d", s/250, s%250+1),
				Ports: []corev1.ServicePort{
					{Name: "http", Port: 80, TargetPort: intstr.FromString("http")},
					{Name: "grpc", Port: 9090, TargetPort: intstr.FromInt32(9090)},
				},
			},
		})
	}
	for p := 0; p < pods; p++ {
		s := p % services
		in.Pods = append(in.Pods, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{
				Name: fmt.Sprintf("app-%d-%d", s, p), Namespace: fmt.Sprintf("ns-%d", s%namespaces),
				Labels:          map[string]string{"app": fmt.Sprintf("app-%d", s), "version": "v1", labelPodTemplateHash: "abc"},
				Annotations:     map[string]string{AnnotationRedirection: RedirectionEnabled},
				OwnerReferences: []metav1.OwnerReference{{Kind: "ReplicaSet", Name: fmt.Sprintf("app-%d-abc", s), Controller: ptrTo(true)}},
			},
			Spec: corev1.PodSpec{
				NodeName: fmt.Sprintf("node-%d", p%nodes), ServiceAccountName: fmt.Sprintf("sa-%d", s),
				Containers: []corev1.Container{{Name: "app", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}},
			},
			Status: corev1.PodStatus{
				Phase: corev1.PodRunning, PodIP: fmt.Sprintf("10.%d.%d.%d", 1+p/65000, (p/250)%250, p%250+1),
				Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
			},
		})
	}
	for i := 0; i < policies; i++ {
		ns := fmt.Sprintf("ns-%d", i%namespaces)
		pol := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("pol-%d", i), Namespace: ns}}
		pol.Spec.Rules = []*securityapi.Rule{{
			From: []*securityapi.Rule_From{{Source: &securityapi.Source{Principals: []string{fmt.Sprintf("cluster.local/ns/%s/sa/sa-%d", ns, i)}}}},
			To:   []*securityapi.Rule_To{{Operation: &securityapi.Operation{Ports: []string{"8080"}}}},
		}}
		if i%5 != 0 {
			pol.Spec.Selector = &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", i%services)}}
		}
		in.AuthorizationPolicies = append(in.AuthorizationPolicies, pol)
	}
	in.PeerAuthentications = append(in.PeerAuthentications, &securityv1.PeerAuthentication{
		ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: "istio-system"},
		Spec:       securityapi.PeerAuthentication{Mtls: &securityapi.PeerAuthentication_MutualTLS{Mode: securityapi.PeerAuthentication_MutualTLS_STRICT}},
	})
	return in
}

func ptrTo[T any](v T) *T { return &v }

// A dry-run policy reaches ztunnel converted exactly as the same policy
// without the annotation, except for dry_run; its condition says so.
func TestDryRunPolicyIsSentAsConvertedWithDryRunSet(t *testing.T) {
	in := loadInputs(t, "testdata/authorization.yaml")
	for _, p := range in.AuthorizationPolicies {
		delete(p.Annotations, AnnotationDryRun)
	}
	enforced := Compute(DefaultCluster(), in)
	for _, p := range in.AuthorizationPolicies {
		if p.Annotations == nil {
			p.Annotations = map[string]string{}
		}
		p.Annotations[AnnotationDryRun] = "true"
	}
	dryRun := Compute(DefaultCluster(), in)

	if len(dryRun.Authorizations) != len(enforced.Authorizations) {
		t.Fatalf("%d authorizations in dry-run, %d enforced", len(dryRun.Authorizations), len(enforced.Authorizations))
	}
	for name, want := range enforced.Authorizations {
		got := dryRun.Authorizations[name]
		if want.GetDryRun() {
			t.Errorf("%s: dry_run set without the annotation", name)
		}
		if !got.GetDryRun() {
			t.Errorf("%s: dry_run not set with the annotation", name)
			continue
		}
		got = proto.Clone(got).(*security.Authorization)
		got.DryRun = false
		if !proto.Equal(got, want) {
			t.Errorf("%s: dry-run conversion differs beyond dry_run:\n got %v\nwant %v", name, got, want)
		}
	}
	for uid, want := range enforced.Addresses {
		if !proto.Equal(dryRun.Addresses[uid], want) {
			t.Errorf("%s: address differs in dry-run (a workload must list its dry-run policies too)", uid)
		}
	}
	for key, want := range enforced.PolicyStatus {
		got := dryRun.PolicyStatus[key]
		if len(got) != len(want) {
			t.Fatalf("%s: conditions %v, want as enforced %v", key, got, want)
		}
		for i := range want {
			if got[i].Status != want[i].Status || got[i].Reason != want[i].Reason {
				t.Errorf("%s: condition %s/%s, want as enforced %s/%s", key, got[i].Status, got[i].Reason, want[i].Status, want[i].Reason)
			}
			if want[i].Status == metav1.ConditionTrue && !strings.Contains(got[i].Message, "dry-run") {
				t.Errorf("%s: message %q does not mention dry-run", key, got[i].Message)
			}
		}
	}
}
