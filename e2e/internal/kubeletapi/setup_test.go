package kubeletapi

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/rest"
	k8stesting "k8s.io/client-go/testing"
)

const testNode = "node-a"

// testCA is a throwaway CA that signs the serving and client certificates.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

var serial atomic.Int64

// issue returns PEM certificate and key for a leaf.
func (ca *testCA) issue(t *testing.T, subject pkix.Name, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(100 + serial.Add(1)),
		Subject:      subject,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// fakeRuntime serves one pod, default/web, with container "app" backed by a
// real process.
type fakeRuntime struct {
	mu      sync.Mutex
	pid     int    // guarded by mu; 0: not running
	logPath string // guarded by mu
	prev    string // guarded by mu
	netns   string // guarded by mu
}

func (f *fakeRuntime) known(ns, pod, ctr string) error {
	if ns != "default" || pod != "web" || (ctr != "" && ctr != "app") {
		return fmt.Errorf("%s/%s %q: %w", ns, pod, ctr, ErrNotFound)
	}
	return nil
}

func (f *fakeRuntime) ContainerLogPath(ns, pod, ctr string, previous bool) (string, error) {
	if err := f.known(ns, pod, ctr); err != nil {
		return "", err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if previous {
		return f.prev, nil
	}
	return f.logPath, nil
}

func (f *fakeRuntime) ContainerPID(ns, pod, ctr string) (int, error) {
	if err := f.known(ns, pod, ctr); err != nil {
		return 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.pid == 0 {
		return 0, errors.New("container is not running")
	}
	return f.pid, nil
}

func (f *fakeRuntime) PodNetNS(ns, pod string) (string, error) {
	if err := f.known(ns, pod, ""); err != nil {
		return "", err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.netns, nil
}

func (f *fakeRuntime) set(fn func(f *fakeRuntime)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

// reviews is the fake apiserver's answers to TokenReview and
// SubjectAccessReview.
type reviews struct {
	mu      sync.Mutex
	tokens  map[string]authenticationv1.UserInfo               // guarded by mu
	allow   func(authorizationv1.SubjectAccessReviewSpec) bool // guarded by mu
	sars    []authorizationv1.SubjectAccessReviewSpec          // guarded by mu; every review asked
	trCount int                                                // guarded by mu
}

func (r *reviews) install(cs *fake.Clientset) {
	cs.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		tr := a.(k8stesting.CreateAction).GetObject().(*authenticationv1.TokenReview).DeepCopy()
		r.mu.Lock()
		defer r.mu.Unlock()
		r.trCount++
		if u, ok := r.tokens[tr.Spec.Token]; ok {
			tr.Status = authenticationv1.TokenReviewStatus{Authenticated: true, User: u}
		}
		return true, tr, nil
	})
	cs.PrependReactor("create", "subjectaccessreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		sar := a.(k8stesting.CreateAction).GetObject().(*authorizationv1.SubjectAccessReview).DeepCopy()
		r.mu.Lock()
		defer r.mu.Unlock()
		r.sars = append(r.sars, sar.Spec)
		sar.Status.Allowed = r.allow != nil && r.allow(sar.Spec)
		if !sar.Status.Allowed {
			sar.Status.Reason = "test policy"
		}
		return true, sar, nil
	})
}

func (r *reviews) asked() []authorizationv1.SubjectAccessReviewSpec {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]authorizationv1.SubjectAccessReviewSpec(nil), r.sars...)
}

// testEnv is a running Server with its certificates and fakes.
type testEnv struct {
	srv      *Server
	rt       *fakeRuntime
	rev      *reviews
	addr     string
	ca       *testCA
	caPEM    []byte
	admin    tls.Certificate // CN=kube-apiserver-kubelet-client, O=system:masters
	adminPEM [2][]byte
}

func newTestEnv(t *testing.T) *testEnv {
	t.Helper()
	dir := t.TempDir()
	ca := newTestCA(t, "test-ca")
	servCert, servKey := ca.issue(t, pkix.Name{CommonName: testNode}, true)
	clientCert, clientKey := ca.issue(t, pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}}, false)
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	rev := &reviews{
		tokens: map[string]authenticationv1.UserInfo{
			"alice-token": {Username: "alice", UID: "u-1", Groups: []string{"devs", "system:authenticated"}},
			"bob-token":   {Username: "bob", Groups: []string{"system:authenticated"}},
		},
		// alice and the apiserver may use the node's proxy subresource.
		allow: func(s authorizationv1.SubjectAccessReviewSpec) bool {
			return s.User == "alice" || s.User == "kube-apiserver-kubelet-client"
		},
	}
	cs := fake.NewClientset()
	rev.install(cs)
	rt := &fakeRuntime{netns: "/proc/self/ns/net", logPath: filepath.Join(dir, "0.log")}
	srv, err := New(Config{
		Addr:         "127.0.0.1:0",
		CertFile:     write("tls.crt", servCert),
		KeyFile:      write("tls.key", servKey),
		ClientCAFile: write("ca.crt", ca.pem),
		NodeName:     testNode,
		Client:       cs,
		Runtime:      rt,
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if err := srv.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	})
	admin, err := tls.X509KeyPair(clientCert, clientKey)
	if err != nil {
		t.Fatal(err)
	}
	return &testEnv{srv: srv, rt: rt, rev: rev, addr: ln.Addr().String(), ca: ca, caPEM: ca.pem, admin: admin, adminPEM: [2][]byte{clientCert, clientKey}}
}

// restConfig is how the apiserver reaches the kubelet: its kubelet client
// certificate.
func (e *testEnv) restConfig() *rest.Config {
	return &rest.Config{
		Host: "https://" + e.addr,
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   e.caPEM,
			CertData: e.adminPEM[0],
			KeyData:  e.adminPEM[1],
		},
	}
}

// httpClient returns a client trusting the test CA, presenting certs.
func (e *testEnv) httpClient(certs ...tls.Certificate) *http.Client {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(e.caPEM)
	tc := &tls.Config{RootCAs: pool}
	if len(certs) > 0 {
		// Present the certificate even when the server names other CAs.
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &certs[0], nil }
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: tc}}
}

func (e *testEnv) url(path string) string { return "https://" + e.addr + path }

// startContainer starts a process standing in for the container (in fresh
// network and mount namespaces when possible) and returns its pid.
func startContainer(t *testing.T, isolated bool) int {
	t.Helper()
	var cmd *exec.Cmd
	if isolated {
		cmd = exec.Command("unshare", "--net", "--mount", "--propagation", "private", "sleep", "300")
	} else {
		cmd = exec.Command("sleep", "300")
	}
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "CONTAINER_GREETING=hello from the container"}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	if isolated {
		// unshare execs sleep once the namespaces exist.
		deadline := time.Now().Add(5 * time.Second)
		for {
			exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", cmd.Process.Pid))
			if filepath.Base(exe) == "sleep" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("unshare did not exec sleep (exe %q)", exe)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return cmd.Process.Pid
}

// canUnshare reports whether the test may make namespaces (root, with
// unshare and nsenter installed).
func canUnshare(t *testing.T) bool {
	t.Helper()
	if os.Geteuid() != 0 {
		return false
	}
	for _, bin := range []string{"unshare", "nsenter"} {
		if _, err := exec.LookPath(bin); err != nil {
			return false
		}
	}
	return true
}
