package volume

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	apitypes "k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

func ptr[T any](v T) *T { return &v }

// tokenServer answers TokenRequests on the fake clientset with numbered
// tokens and remembers the requests.
type tokenServer struct {
	mu       sync.Mutex
	requests []*authenticationv1.TokenRequest
	sa       []string
	n        atomic.Int32
	now      func() time.Time
}

func (ts *tokenServer) install(c *fake.Clientset) {
	c.PrependReactor("create", "serviceaccounts", func(a k8stesting.Action) (bool, runtime.Object, error) {
		ca := a.(k8stesting.CreateAction)
		if ca.GetSubresource() != "token" {
			return false, nil, nil
		}
		tr := ca.GetObject().(*authenticationv1.TokenRequest).DeepCopy()
		ts.mu.Lock()
		ts.requests = append(ts.requests, tr.DeepCopy())
		ts.sa = append(ts.sa, a.(k8stesting.CreateActionImpl).Name)
		ts.mu.Unlock()
		n := ts.n.Add(1)
		tr.Status.Token = fmt.Sprintf("token-%d-%s", n, strings.Repeat("x", 4096))
		tr.Status.ExpirationTimestamp = metav1.NewTime(ts.now().Add(time.Duration(*tr.Spec.ExpirationSeconds) * time.Second))
		return true, tr, nil
	})
}

type env struct {
	m      *Manager
	client *fake.Clientset
	tokens *tokenServer
	now    time.Time
	root   string
}

func newEnv(t *testing.T, objs ...runtime.Object) *env {
	t.Helper()
	root := t.TempDir()
	e := &env{client: fake.NewClientset(objs...), now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), root: root}
	e.tokens = &tokenServer{now: func() time.Time { return e.now }}
	e.tokens.install(e.client)
	e.m = &Manager{Client: e.client, NodeRoot: filepath.Join(root, "node"), PodsDir: filepath.Join(root, "node/var/lib/kubelet/pods")}
	e.m.now = func() time.Time { return e.now }
	return e
}

func pod(vols ...corev1.Volume) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: "web-0", Namespace: "app", UID: "uid-1",
			Labels: map[string]string{"app": "web", "tier": "front"}, Annotations: map[string]string{"note": "hi"},
		},
		Spec: corev1.PodSpec{
			NodeName: "node-a", ServiceAccountName: "web-sa", Volumes: vols,
			Containers: []corev1.Container{{Name: "main", Resources: corev1.ResourceRequirements{
				Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Mi")},
			}}},
		},
	}
}

func cm(name string, data map[string]string) *corev1.ConfigMap {
	return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "app"}, Data: data}
}

func secret(name string, data map[string]string) *corev1.Secret {
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "app"}, Data: map[string][]byte{}}
	for k, v := range data {
		s.Data[k] = []byte(v)
	}
	return s
}

// contents reads every user-visible file of a volume dir: path -> "mode data".
func contents(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "..") {
			continue
		}
		root := filepath.Join(dir, e.Name())
		if info, err := os.Stat(root); err == nil && info.IsDir() {
			root += "/" // walk through the user-visible symlink
		}
		filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				t.Fatal(err)
			}
			info, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if info.IsDir() {
				return nil
			}
			data, _ := os.ReadFile(p)
			rel, _ := filepath.Rel(dir, p)
			out[rel] = fmt.Sprintf("%o %s", info.Mode().Perm(), data)
			return nil
		})
	}
	return out
}

func TestSetupWritesVolumes(t *testing.T) {
	tests := []struct {
		name    string
		vol     corev1.VolumeSource
		want    map[string]string
		wantErr string
	}{
		{
			name: "a configmap projects every key with the default mode",
			vol:  corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}}},
			want: map[string]string{"a": "644 1", "b": "644 2"},
		},
		{
			name: "configmap items pick keys, paths and modes",
			vol: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
				LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}, DefaultMode: ptr[int32](0o600),
				Items: []corev1.KeyToPath{{Key: "a", Path: "dir/x.conf"}, {Key: "b", Path: "y", Mode: ptr[int32](0o400)}},
			}},
			want: map[string]string{"dir/x.conf": "600 1", "y": "400 2"},
		},
		{
			name: "an optional missing configmap gives an empty volume",
			vol:  corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "gone"}, Optional: ptr(true)}},
			want: map[string]string{},
		},
		{
			name:    "a missing configmap is an error naming it",
			vol:     corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "gone"}}},
			wantErr: `volume "v": configmap "gone" not found`,
		},
		{
			name: "a missing item key is an error naming it",
			vol: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
				LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}, Items: []corev1.KeyToPath{{Key: "zz", Path: "zz"}},
			}},
			wantErr: `key "zz" in configmap "cfg" not found`,
		},
		{
			name: "a secret projects its keys",
			vol:  corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "creds", DefaultMode: ptr[int32](0o440)}},
			want: map[string]string{"tls.key": "440 KEY"},
		},
		{
			name:    "a missing secret is an error naming it",
			vol:     corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "vault"}},
			wantErr: `secret "vault" not found`,
		},
		{
			name: "downwardAPI items read the pod",
			vol: corev1.VolumeSource{DownwardAPI: &corev1.DownwardAPIVolumeSource{Items: []corev1.DownwardAPIVolumeFile{
				{Path: "name", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}},
				{Path: "labels", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.labels"}},
				{Path: "note", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.annotations['note']"}},
				{Path: "mem", ResourceFieldRef: &corev1.ResourceFieldSelector{ContainerName: "main", Resource: "limits.memory", Divisor: resource.MustParse("1Mi")}},
			}}},
			want: map[string]string{"name": "644 web-0", "labels": "644 app=\"web\"\ntier=\"front\"", "note": "644 hi", "mem": "644 64"},
		},
		{
			name:    "an unsupported volume type is a clear error",
			vol:     corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "data"}},
			wantErr: "unsupported volume type persistentVolumeClaim",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, cm("cfg", map[string]string{"a": "1", "b": "2"}), secret("creds", map[string]string{"tls.key": "KEY"}))
			p := pod(corev1.Volume{Name: "v", VolumeSource: tt.vol})
			err := e.m.Setup(context.Background(), p)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := contents(t, e.m.Dir(p.UID, "v"))
			if !mapsEqual(got, tt.want) {
				t.Errorf("contents = %q, want %q", got, tt.want)
			}
		})
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func projectedPod() *corev1.Pod {
	return pod(corev1.Volume{Name: "kube-api-access", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
		DefaultMode: ptr[int32](0o644),
		Sources: []corev1.VolumeProjection{
			{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token", ExpirationSeconds: ptr[int64](3607), Audience: "istio-ca"}},
			{ConfigMap: &corev1.ConfigMapProjection{LocalObjectReference: corev1.LocalObjectReference{Name: "kube-root-ca.crt"}, Items: []corev1.KeyToPath{{Key: "ca.crt", Path: "ca.crt"}}}},
			{DownwardAPI: &corev1.DownwardAPIProjection{Items: []corev1.DownwardAPIVolumeFile{{Path: "namespace", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}}}},
		},
	}}})
}

func TestProjectedVolumeRequestsBoundToken(t *testing.T) {
	e := newEnv(t, cm("kube-root-ca.crt", map[string]string{"ca.crt": "CA"}))
	p := projectedPod()
	if err := e.m.Setup(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	dir := e.m.Dir(p.UID, "kube-api-access")
	got := contents(t, dir)
	if got["ca.crt"] != "644 CA" || got["namespace"] != "644 app" || !strings.HasPrefix(got["token"], "644 token-1-") {
		t.Errorf("contents = %.80q", got)
	}
	if len(e.tokens.requests) != 1 {
		t.Fatalf("%d token requests, want 1", len(e.tokens.requests))
	}
	req := e.tokens.requests[0]
	if e.tokens.sa[0] != "web-sa" {
		t.Errorf("token for service account %q, want web-sa", e.tokens.sa[0])
	}
	if !slices.Equal(req.Spec.Audiences, []string{"istio-ca"}) {
		t.Errorf("audiences = %v", req.Spec.Audiences)
	}
	if *req.Spec.ExpirationSeconds != 3607 {
		t.Errorf("expirationSeconds = %d", *req.Spec.ExpirationSeconds)
	}
	if b := req.Spec.BoundObjectRef; b == nil || b.Kind != "Pod" || b.Name != "web-0" || b.UID != "uid-1" {
		t.Errorf("boundObjectRef = %+v", b)
	}
	// Setup again is idempotent: no new token, no new data dir.
	before, _ := os.Readlink(filepath.Join(dir, dataDirName))
	if err := e.m.Setup(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	after, _ := os.Readlink(filepath.Join(dir, dataDirName))
	if len(e.tokens.requests) != 1 || before != after {
		t.Errorf("second Setup: %d requests, data dir %s -> %s", len(e.tokens.requests), before, after)
	}
}

func TestTokenExpirationDefaultsAndMinimum(t *testing.T) {
	for _, tt := range []struct {
		name string
		exp  *int64
		want int64
	}{
		{"an unset expiration asks for an hour", nil, 3600},
		{"a short expiration is raised to ten minutes", ptr[int64](60), 600},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			p := pod(corev1.Volume{Name: "t", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
				{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token", ExpirationSeconds: tt.exp}},
			}}}})
			p.Spec.ServiceAccountName = ""
			if err := e.m.Setup(context.Background(), p); err != nil {
				t.Fatal(err)
			}
			if got := *e.tokens.requests[0].Spec.ExpirationSeconds; got != tt.want {
				t.Errorf("expirationSeconds = %d, want %d", got, tt.want)
			}
			if e.tokens.sa[0] != "default" {
				t.Errorf("service account %q, want default", e.tokens.sa[0])
			}
			if len(e.tokens.requests[0].Spec.Audiences) != 0 {
				t.Errorf("audiences = %v, want none", e.tokens.requests[0].Spec.Audiences)
			}
		})
	}
}

func readToken(t *testing.T, dir string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "token"))
	if err != nil {
		t.Fatal(err)
	}
	tok, _, _ := strings.Cut(string(b), "-x")
	return tok
}

func TestRefreshRotatesTokenAfter80PercentOfItsLifetime(t *testing.T) {
	e := newEnv(t, cm("kube-root-ca.crt", map[string]string{"ca.crt": "CA"}))
	p := projectedPod()
	ctx := context.Background()
	if err := e.m.Setup(ctx, p); err != nil {
		t.Fatal(err)
	}
	dir := e.m.Dir(p.UID, "kube-api-access")
	var seen []string
	for _, step := range []time.Duration{
		time.Hour,          // 3600s of 3607s: past 80%
		2000 * time.Second, // 2000s into the second token: not yet
		900 * time.Second,  // 2900s: past 2885.6s
		time.Second,        // just after: the third token is fresh
	} {
		e.now = e.now.Add(step)
		if err := e.m.Refresh(ctx, p); err != nil {
			t.Fatal(err)
		}
		seen = append(seen, readToken(t, dir))
	}
	want := []string{"token-2", "token-2", "token-3", "token-3"}
	if !slices.Equal(seen, want) {
		t.Errorf("tokens = %v, want %v", seen, want)
	}
}

func TestRefreshResyncsConfigMapsAndSecrets(t *testing.T) {
	e := newEnv(t, cm("cfg", map[string]string{"a": "1", "old": "x"}), secret("creds", map[string]string{"k": "v1"}))
	p := pod(
		corev1.Volume{Name: "c", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}}}},
		corev1.Volume{Name: "s", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "creds"}}},
	)
	ctx := context.Background()
	if err := e.m.Setup(ctx, p); err != nil {
		t.Fatal(err)
	}
	e.client.CoreV1().ConfigMaps("app").Update(ctx, cm("cfg", map[string]string{"a": "2", "new": "y"}), metav1.UpdateOptions{})
	e.client.CoreV1().Secrets("app").Update(ctx, secret("creds", map[string]string{"k": "v2"}), metav1.UpdateOptions{})
	if err := e.m.Refresh(ctx, p); err != nil {
		t.Fatal(err)
	}
	if got, want := contents(t, e.m.Dir(p.UID, "c")), map[string]string{"a": "644 2", "new": "644 y"}; !mapsEqual(got, want) {
		t.Errorf("configmap volume = %q, want %q", got, want)
	}
	if got, want := contents(t, e.m.Dir(p.UID, "s")), map[string]string{"k": "644 v2"}; !mapsEqual(got, want) {
		t.Errorf("secret volume = %q, want %q", got, want)
	}
	// Exactly one data dir remains.
	var dataDirs []string
	entries, _ := os.ReadDir(e.m.Dir(p.UID, "c"))
	for _, en := range entries {
		if strings.HasPrefix(en.Name(), "..") && en.Name() != dataDirName {
			dataDirs = append(dataDirs, en.Name())
		}
	}
	if len(dataDirs) != 1 {
		t.Errorf("data dirs = %v, want one", dataDirs)
	}

	// A source that goes away keeps the old contents and reports it.
	e.client.CoreV1().ConfigMaps("app").Delete(ctx, "cfg", metav1.DeleteOptions{})
	err := e.m.Refresh(ctx, p)
	if !errors.Is(err, ErrNotFound) {
		t.Errorf("Refresh after delete: %v, want ErrNotFound", err)
	}
	if got := contents(t, e.m.Dir(p.UID, "c")); got["a"] != "644 2" {
		t.Errorf("contents after failed refresh = %q", got)
	}
}

// TestAtomicWriterReadersNeverSeeHalfAPayload reads a token through its
// user-visible link while it is rewritten: every read is one whole token.
func TestAtomicWriterReadersNeverSeeHalfAPayload(t *testing.T) {
	dir := t.TempDir()
	payload := func(i int) map[string]file {
		return map[string]file{"token": {data: []byte(strings.Repeat(string(rune('a'+i%26)), 64<<10)), mode: 0o644}}
	}
	if _, err := writeAtomic(dir, payload(0)); err != nil {
		t.Fatal(err)
	}
	var (
		stop  atomic.Bool
		bad   atomic.Value
		reads atomic.Int64
		wg    sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			b, err := os.ReadFile(filepath.Join(dir, "token"))
			if err != nil {
				// A reader may race with the old data dir's removal after
				// resolving ..data; the kubelet's layout allows ENOENT there,
				// never a partial file.
				if !errors.Is(err, fs.ErrNotExist) {
					bad.Store(err.Error())
				}
				continue
			}
			reads.Add(1)
			if len(b) != 64<<10 || strings.Count(string(b), string(b[0])) != len(b) {
				bad.Store(fmt.Sprintf("torn read of %d bytes", len(b)))
			}
		}
	}()
	for i := 1; i < 200; i++ {
		if _, err := writeAtomic(dir, payload(i)); err != nil {
			t.Fatal(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	if v := bad.Load(); v != nil {
		t.Fatal(v)
	}
	if reads.Load() == 0 {
		t.Fatal("reader never read the file")
	}
}

func TestAtomicWriterRemovesStaleFilesAndRejectsEscapes(t *testing.T) {
	dir := t.TempDir()
	if _, err := writeAtomic(dir, map[string]file{"a/b": {data: []byte("1"), mode: 0o644}, "c": {data: []byte("2"), mode: 0o644}}); err != nil {
		t.Fatal(err)
	}
	changed, err := writeAtomic(dir, map[string]file{"c": {data: []byte("2"), mode: 0o644}})
	if err != nil || !changed {
		t.Fatalf("changed=%v err=%v", changed, err)
	}
	os.Mkdir(filepath.Join(dir, "nested-mountpoint"), 0o755)
	if got := contents(t, dir); !mapsEqual(got, map[string]string{"c": "644 2"}) {
		t.Errorf("contents = %q", got)
	}
	changed, err = writeAtomic(dir, map[string]file{"c": {data: []byte("2"), mode: 0o644}})
	if err != nil || changed {
		t.Errorf("unchanged payload: changed=%v err=%v", changed, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "nested-mountpoint")); err != nil {
		t.Errorf("a directory the writer did not make was removed: %v", err)
	}
	for _, p := range []string{"../x", "/etc/passwd", "..data", "a/../../x"} {
		if _, err := writeAtomic(dir, map[string]file{p: {}}); err == nil {
			t.Errorf("path %q accepted", p)
		}
	}
}

func TestEmptyDirAndTeardown(t *testing.T) {
	e := newEnv(t)
	p := pod(corev1.Volume{Name: "scratch", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory}}})
	if err := e.m.Setup(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	info, err := os.Stat(e.m.Dir(p.UID, "scratch"))
	if err != nil || !info.IsDir() || info.Mode().Perm() != 0o777 {
		t.Fatalf("emptyDir: %v %v", info, err)
	}
	if err := e.m.Teardown(p.UID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(e.m.PodsDir, "uid-1", "volumes")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("volumes dir still there: %v", err)
	}
	if err := e.m.Teardown(p.UID); err != nil {
		t.Errorf("second Teardown: %v", err)
	}
}

func TestHostPathMapping(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"/etc/cni/net.d", "/node/etc/cni/net.d"},
		{"/var/run/ztunnel/", "/node/var/run/ztunnel"},
		{"/", "/node"},
		{"/proc", "/proc"},
		{"/proc/1/ns", "/proc/1/ns"},
		{"/sys/fs/bpf", "/sys/fs/bpf"},
		{"/dev/net/tun", "/dev/net/tun"},
		{"/lib/modules", "/lib/modules"},
		{"/lib/modulesx", "/node/lib/modulesx"},
		{"/process", "/node/process"},
		{"/var/../proc", "/proc"},
	} {
		if got := HostPath("/node", tt.in); got != tt.want {
			t.Errorf("HostPath(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestHostPathTypes(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(root string)
		path    string
		typ     corev1.HostPathType
		wantErr string
		isDir   *bool
	}{
		{name: "DirectoryOrCreate creates a directory", path: "/a/b", typ: corev1.HostPathDirectoryOrCreate, isDir: ptr(true)},
		{name: "FileOrCreate creates a file and its parents", path: "/run/x.sock", typ: corev1.HostPathFileOrCreate, isDir: ptr(false)},
		{name: "Directory must exist", path: "/missing", typ: corev1.HostPathDirectory, wantErr: "does not exist"},
		{name: "File rejects a directory", prepare: func(r string) { os.MkdirAll(r+"/d", 0o755) }, path: "/d", typ: corev1.HostPathFile, wantErr: "is not a file"},
		{name: "Socket rejects a file", prepare: func(r string) { os.WriteFile(r+"/f", nil, 0o644) }, path: "/f", typ: corev1.HostPathSocket, wantErr: "is not a socket"},
		{name: "CharDevice accepts /dev/null", path: "/dev/null", typ: corev1.HostPathCharDev},
		{name: "BlockDevice rejects /dev/null", path: "/dev/null", typ: corev1.HostPathBlockDev, wantErr: "is not a block device"},
		{name: "an empty type checks nothing", path: "/nothing", typ: corev1.HostPathUnset},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			if tt.prepare != nil {
				os.MkdirAll(e.m.NodeRoot, 0o755)
				tt.prepare(e.m.NodeRoot)
			}
			p := pod(corev1.Volume{Name: "h", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: tt.path, Type: &tt.typ}}})
			err := e.m.Setup(context.Background(), p)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tt.isDir != nil {
				info, err := os.Stat(HostPath(e.m.NodeRoot, tt.path))
				if err != nil || info.IsDir() != *tt.isDir {
					t.Errorf("stat: %v %v, want dir=%v", info, err, *tt.isDir)
				}
			}
		})
	}
}

func TestMounts(t *testing.T) {
	e := newEnv(t, cm("cfg", map[string]string{"app.yaml": "x: 1"}), cm("kube-root-ca.crt", map[string]string{"ca.crt": "CA"}))
	ctrRoot := filepath.Join(e.root, "ctr") // stands in for / on the host
	os.MkdirAll(filepath.Join(ctrRoot, "etc"), 0o755)
	p := projectedPod()
	p.Spec.Volumes = append(p.Spec.Volumes,
		corev1.Volume{Name: "cfg", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}}}},
		corev1.Volume{Name: "data", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
		corev1.Volume{Name: "cni", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/etc/cni/net.d", Type: ptr(corev1.HostPathDirectoryOrCreate)}}},
	)
	p.Spec.Containers[0].Env = []corev1.EnvVar{{Name: "POD", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}}}
	p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{
		{Name: "kube-api-access", MountPath: ctrRoot + "/var/run/secrets/kubernetes.io/serviceaccount", ReadOnly: true},
		{Name: "cfg", MountPath: ctrRoot + "/etc/app/app.yaml", SubPath: "app.yaml"},
		{Name: "data", MountPath: ctrRoot + "/var/lib/app/cache", SubPathExpr: "$(POD)"},
		{Name: "data", MountPath: ctrRoot + "/var/lib/app"},
		{Name: "cni", MountPath: ctrRoot + "/host/etc/cni/net.d"},
	}
	if err := e.m.Setup(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	mounts, err := e.m.Mounts(p, &p.Spec.Containers[0])
	if err != nil {
		t.Fatal(err)
	}
	vol := func(name string) string { return e.m.Dir(p.UID, name) }
	cfgFile, _ := filepath.EvalSymlinks(filepath.Join(vol("cfg"), "app.yaml"))
	want := []nsexec.Mount{
		{Source: cfgFile, Target: ctrRoot + "/etc/app/app.yaml", ReadOnly: true},
		{Source: vol("data"), Target: ctrRoot + "/var/lib/app"},
		{Source: filepath.Join(vol("data"), "web-0"), Target: ctrRoot + "/var/lib/app/cache"},
		{Source: filepath.Join(e.m.NodeRoot, "etc/cni/net.d"), Target: ctrRoot + "/host/etc/cni/net.d"},
		{Source: vol("kube-api-access"), Target: ctrRoot + "/var/run/secrets/kubernetes.io/serviceaccount", ReadOnly: true},
	}
	if !slices.Equal(mounts, want) {
		t.Errorf("mounts:\n got %+v\nwant %+v", mounts, want)
	}
	// Targets exist: files for files, dirs for dirs; the nested one inside
	// the parent mount's source.
	for path, dir := range map[string]bool{
		ctrRoot + "/etc/app/app.yaml":                             false,
		ctrRoot + "/var/lib/app":                                  true,
		filepath.Join(vol("data"), "cache"):                       true,
		ctrRoot + "/var/run/secrets/kubernetes.io/serviceaccount": true,
	} {
		if info, err := os.Stat(path); err != nil || info.IsDir() != dir {
			t.Errorf("target %s: %v %v, want dir=%v", path, info, err, dir)
		}
	}
	recorded := readRecorded(t, e.m)
	wantRecorded := []string{
		ctrRoot + "/etc/app", ctrRoot + "/etc/app/app.yaml",
		ctrRoot + "/host", ctrRoot + "/host/etc", ctrRoot + "/host/etc/cni", ctrRoot + "/host/etc/cni/net.d",
		ctrRoot + "/var", ctrRoot + "/var/lib", ctrRoot + "/var/lib/app",
		ctrRoot + "/var/run", ctrRoot + "/var/run/secrets", ctrRoot + "/var/run/secrets/kubernetes.io", ctrRoot + "/var/run/secrets/kubernetes.io/serviceaccount",
	}
	slices.Sort(recorded)
	if !slices.Equal(recorded, wantRecorded) {
		t.Errorf("recorded:\n got %q\nwant %q", recorded, wantRecorded)
	}
}

func readRecorded(t *testing.T, m *Manager) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(m.NodeRoot, createdMountpoints))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(string(b))
}

// TestMountsRecordsEachTargetOnceUnderConcurrency has many pods mount the
// same targets at once, as pods of several nodes on one machine do.
func TestMountsRecordsEachTargetOnceUnderConcurrency(t *testing.T) {
	e := newEnv(t)
	target := filepath.Join(e.root, "ctr/var/run/shared")
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := pod(corev1.Volume{Name: "d", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
			p.UID = apitypes.UID(fmt.Sprintf("uid-%d", i))
			p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "d", MountPath: target}}
			if err := e.m.Setup(context.Background(), p); err != nil {
				errs <- err
				return
			}
			if _, err := e.m.Mounts(p, &p.Spec.Containers[0]); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	got := readRecorded(t, e.m)
	want := []string{filepath.Join(e.root, "ctr"), filepath.Join(e.root, "ctr/var"), filepath.Join(e.root, "ctr/var/run"), target}
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("recorded %q, want %q", got, want)
	}
}

func TestMountsErrors(t *testing.T) {
	e := newEnv(t, cm("cfg", map[string]string{"a": "1"}))
	base := pod(
		corev1.Volume{Name: "cfg", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}}}},
		corev1.Volume{Name: "d", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
	)
	if err := e.m.Setup(context.Background(), base); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(e.root, "afile")
	os.WriteFile(file, nil, 0o644)
	for _, tt := range []struct {
		name    string
		vm      corev1.VolumeMount
		wantErr string
	}{
		{"a mount of an unknown volume fails", corev1.VolumeMount{Name: "nope", MountPath: e.root + "/x"}, `no volume "nope"`},
		{"a subPath may not climb out", corev1.VolumeMount{Name: "d", MountPath: e.root + "/x", SubPath: "../x"}, "contains '..'"},
		{"a missing key as subPath fails", corev1.VolumeMount{Name: "cfg", MountPath: e.root + "/x", SubPath: "zz"}, "resolving subPath"},
		{"a directory cannot go on a file", corev1.VolumeMount{Name: "d", MountPath: file}, "exists as a file"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := base.DeepCopy()
			p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{tt.vm}
			_, err := e.m.Mounts(p, &p.Spec.Containers[0])
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("err = %v, want containing %q", err, tt.wantErr)
			}
		})
	}
}
