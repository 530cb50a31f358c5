package podenv

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
)

func ptr[T any](v T) *T { return &v }

func testPod() *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: "web-0", Namespace: "app", UID: "uid-1",
			Labels:      map[string]string{"app": "web"},
			Annotations: map[string]string{"note": "hi"},
		},
		Spec: corev1.PodSpec{NodeName: "node-a", ServiceAccountName: "web-sa"},
	}
}

var params = Params{
	PodIPs:                []string{"10.244.1.5", "fd00::5"},
	HostIPs:               []string{"172.18.0.2"},
	KubernetesServiceHost: "10.96.0.1",
	KubernetesServicePort: "443",
}

func objects() []runtime.Object {
	return []runtime.Object{
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "cfg", Namespace: "app"},
			Data: map[string]string{"LEVEL": "debug", "bad=key": "x", "mode": "fast"}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "creds", Namespace: "app"},
			Data: map[string][]byte{"PASSWORD": []byte("s3cret")}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "my-db", Namespace: "app"},
			Spec: corev1.ServiceSpec{ClusterIP: "10.96.5.5", Ports: []corev1.ServicePort{{Name: "pg", Port: 5432}}}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "headless", Namespace: "app"},
			Spec: corev1.ServiceSpec{ClusterIP: "None", Ports: []corev1.ServicePort{{Port: 80}}}},
	}
}

func envMap(t *testing.T, env []string) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		if _, dup := m[k]; dup {
			t.Fatalf("duplicate key %q in %v", k, env)
		}
		m[k] = v
	}
	return m
}

func field(path string) *corev1.EnvVarSource {
	return &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}
}

func TestResolve(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(*corev1.Pod)
		ctr     corev1.Container
		want    map[string]string
		absent  []string
		wantErr string
	}{
		{
			name: "literal values expand earlier variables and keep $$ as $",
			ctr: corev1.Container{Env: []corev1.EnvVar{
				{Name: "A", Value: "one"},
				{Name: "B", Value: "$(A)-two-$$(A)-$(NOPE)"},
				{Name: "C", Value: "$(KUBERNETES_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT)"},
			}},
			want: map[string]string{"A": "one", "B": "one-two-$(A)-$(NOPE)", "C": "10.96.0.1:443"},
		},
		{
			name: "field refs read the pod, its IPs and the host IPs",
			ctr: corev1.Container{Env: []corev1.EnvVar{
				{Name: "NAME", ValueFrom: field("metadata.name")},
				{Name: "NS", ValueFrom: field("metadata.namespace")},
				{Name: "UID", ValueFrom: field("metadata.uid")},
				{Name: "APP", ValueFrom: field("metadata.labels['app']")},
				{Name: "NOTE", ValueFrom: field("metadata.annotations['note']")},
				{Name: "NODE", ValueFrom: field("spec.nodeName")},
				{Name: "SA", ValueFrom: field("spec.serviceAccountName")},
				{Name: "IP", ValueFrom: field("status.podIP")},
				{Name: "IPS", ValueFrom: field("status.podIPs")},
				{Name: "HOST", ValueFrom: field("status.hostIP")},
				{Name: "HOSTS", ValueFrom: field("status.hostIPs")},
			}},
			want: map[string]string{
				"NAME": "web-0", "NS": "app", "UID": "uid-1", "APP": "web", "NOTE": "hi",
				"NODE": "node-a", "SA": "web-sa", "IP": "10.244.1.5", "IPS": "10.244.1.5,fd00::5",
				"HOST": "172.18.0.2", "HOSTS": "172.18.0.2",
			},
		},
		{
			name: "resource fields divide and round up",
			ctr: corev1.Container{
				Resources: corev1.ResourceRequirements{
					Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("250m"), corev1.ResourceMemory: resource.MustParse("64Mi")},
					Limits:   corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1500m"), corev1.ResourceMemory: resource.MustParse("128Mi")},
				},
				Env: []corev1.EnvVar{
					{Name: "REQ_CPU", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "requests.cpu"}}},
					{Name: "REQ_CPU_M", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "requests.cpu", Divisor: resource.MustParse("1m")}}},
					{Name: "LIM_CPU", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.cpu"}}},
					{Name: "REQ_MEM", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "requests.memory", Divisor: resource.MustParse("1Mi")}}},
					{Name: "LIM_MEM", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.memory"}}},
				},
			},
			want: map[string]string{"REQ_CPU": "1", "REQ_CPU_M": "250", "LIM_CPU": "2", "REQ_MEM": "64", "LIM_MEM": "134217728"},
		},
		{
			name: "configmap and secret keys are read, and env overrides envFrom",
			ctr: corev1.Container{
				EnvFrom: []corev1.EnvFromSource{
					{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}}},
					{Prefix: "S_", SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "creds"}}},
				},
				Env: []corev1.EnvVar{
					{Name: "LEVEL", Value: "info-$(mode)"},
					{Name: "PW", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "creds"}, Key: "PASSWORD"}}},
					{Name: "M", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}, Key: "mode"}}},
				},
			},
			want:   map[string]string{"LEVEL": "info-fast", "mode": "fast", "S_PASSWORD": "s3cret", "PW": "s3cret", "M": "fast"},
			absent: []string{"bad=key", "bad"},
		},
		{
			name: "optional missing sources and keys leave variables out",
			ctr: corev1.Container{
				EnvFrom: []corev1.EnvFromSource{
					{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "gone"}, Optional: ptr(true)}},
					{SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "gone"}, Optional: ptr(true)}},
				},
				Env: []corev1.EnvVar{
					{Name: "X", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "gone"}, Key: "k", Optional: ptr(true)}}},
					{Name: "Y", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}, Key: "nokey", Optional: ptr(true)}}},
					{Name: "Z", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "creds"}, Key: "nokey", Optional: ptr(true)}}},
				},
			},
			absent: []string{"X", "Y", "Z"},
		},
		{
			name: "a missing configmap is an error naming it",
			ctr: corev1.Container{EnvFrom: []corev1.EnvFromSource{
				{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "gone"}}},
			}},
			wantErr: `configmap "gone" not found`,
		},
		{
			name: "a missing secret key is an error naming it",
			ctr: corev1.Container{Env: []corev1.EnvVar{
				{Name: "PW", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "creds"}, Key: "TOKEN"}}},
			}},
			wantErr: `key "TOKEN" in secret "creds" not found`,
		},
		{
			name: "a missing secret is an error naming it",
			ctr: corev1.Container{Env: []corev1.EnvVar{
				{Name: "PW", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "vault"}, Key: "TOKEN"}}},
			}},
			wantErr: `secret "vault" not found`,
		},
		{
			name: "service links cover the kubernetes service and the namespace's services",
			want: map[string]string{
				"KUBERNETES_SERVICE_HOST":       "10.96.0.1",
				"KUBERNETES_SERVICE_PORT":       "443",
				"KUBERNETES_SERVICE_PORT_HTTPS": "443",
				"KUBERNETES_PORT":               "tcp://10.96.0.1:443",
				"KUBERNETES_PORT_443_TCP":       "tcp://10.96.0.1:443",
				"KUBERNETES_PORT_443_TCP_PROTO": "tcp",
				"KUBERNETES_PORT_443_TCP_PORT":  "443",
				"KUBERNETES_PORT_443_TCP_ADDR":  "10.96.0.1",
				"MY_DB_SERVICE_HOST":            "10.96.5.5",
				"MY_DB_SERVICE_PORT":            "5432",
				"MY_DB_SERVICE_PORT_PG":         "5432",
				"MY_DB_PORT_5432_TCP_ADDR":      "10.96.5.5",
			},
			absent: []string{"HEADLESS_SERVICE_HOST"},
		},
		{
			name:   "enableServiceLinks false keeps only the kubernetes service",
			mutate: func(p *corev1.Pod) { p.Spec.EnableServiceLinks = ptr(false) },
			want:   map[string]string{"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_PORT": "tcp://10.96.0.1:443"},
			absent: []string{"MY_DB_SERVICE_HOST"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pod := testPod()
			if tt.mutate != nil {
				tt.mutate(pod)
			}
			client := fake.NewClientset(objects()...)
			env, err := Resolve(context.Background(), client, pod, &tt.ctr, params)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want containing %q", err, tt.wantErr)
				}
				if !errors.Is(err, ErrNotFound) {
					t.Errorf("err %v does not wrap ErrNotFound", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := envMap(t, env)
			for k, v := range tt.want {
				if got[k] != v {
					t.Errorf("%s = %q, want %q", k, got[k], v)
				}
			}
			for _, k := range tt.absent {
				if _, ok := got[k]; ok {
					t.Errorf("%s is set, want absent", k)
				}
			}
		})
	}
}

func TestResolveKeepsDeclarationOrder(t *testing.T) {
	ctr := &corev1.Container{Env: []corev1.EnvVar{{Name: "Z", Value: "1"}, {Name: "A", Value: "2"}}}
	env, err := Resolve(context.Background(), fake.NewClientset(), testPod(), ctr, Params{})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"Z=1", "A=2"}; !slices.Equal(env, want) {
		t.Fatalf("env = %v, want %v", env, want)
	}
}

func TestExpand(t *testing.T) {
	env := []string{"A=x", "B=y", "A=z"}
	tests := []struct {
		name, in, want string
	}{
		{"a reference is replaced by the last value", "$(A)", "z"},
		{"references join with text", "pre-$(B)-$(A)-post", "pre-y-z-post"},
		{"a doubled dollar escapes a reference", "$$(A)", "$(A)"},
		{"an unknown reference stays as written", "$(C)", "$(C)"},
		{"an unterminated reference stays as written", "$(A", "$(A"},
		{"a lone dollar stays", "cost $5 $", "cost $5 $"},
		{"an empty reference stays", "$()", "$()"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Expand([]string{tt.in}, env); got[0] != tt.want {
				t.Errorf("Expand(%q) = %q, want %q", tt.in, got[0], tt.want)
			}
		})
	}
}

func TestFieldRefFormatsWholeMaps(t *testing.T) {
	pod := testPod()
	pod.Labels["tier"] = `a"b`
	got, err := FieldRef(pod, &corev1.ObjectFieldSelector{FieldPath: "metadata.labels"}, Params{})
	if err != nil {
		t.Fatal(err)
	}
	if want := "app=\"web\"\ntier=\"a\\\"b\""; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	if _, err := FieldRef(pod, &corev1.ObjectFieldSelector{FieldPath: "spec.bogus"}, Params{}); err == nil {
		t.Error("unsupported path gave no error")
	}
}
