//go:build e2e

package ztunnel

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

// The benchmark's external references, both Debian's haproxy package (image
// "haproxy" in e2e/cluster/images.yaml):
//   - a pair of haproxy instances that carry a plain TCP connection from a
//     client-side pod over TLS 1.3 with client certificates to a server-side
//     pod on the other node, which connects to the app: the same hops as
//     ztunnel's, without HBONE's multiplexing;
//   - a single haproxy relaying plain TCP on the app's node, no TLS: what one
//     user-space hop costs on this machine before any encryption or framing,
//     the floor under one ztunnel end's CPU.

// Ports of the haproxy pair: the client side listens in plaintext on the
// echo server's ports and the server side on TLS ports.
const (
	haproxyHTTPPort = kubetest.EchoHTTPPort
	haproxyTCPPort  = 9000
	haproxyTLSHTTP  = 8443
	haproxyTLSTCP   = 9443
)

// haproxyCerts returns a CA and, signed by it, the server's and the client's
// certificate each followed by its key, all PEM.
func haproxyCerts(tb testing.TB) (ca, server, client []byte) {
	tb.Helper()
	key := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			tb.Fatal(err)
		}
		return k
	}
	caKey := key()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "haproxy-bench-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		tb.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		tb.Fatal(err)
	}
	leaf := func(serial int64, name string, usage x509.ExtKeyUsage) []byte {
		k := key()
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &k.PublicKey, caKey)
		if err != nil {
			tb.Fatal(err)
		}
		kder, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			tb.Fatal(err)
		}
		return append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
			pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})...)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		leaf(2, "haproxy-server", x509.ExtKeyUsageServerAuth),
		leaf(3, "haproxy-client", x509.ExtKeyUsageClientAuth)
}

const haproxyGlobal = `global
  maxconn 4000
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
defaults
  mode tcp
  timeout connect 5s
  timeout client 2m
  timeout server 2m
`

// haproxyServerConfig terminates mutual TLS and connects to the app at
// appIP.
func haproxyServerConfig(appIP string) string {
	tls := "ssl crt /etc/haproxy/certs/server.pem ca-file /etc/haproxy/certs/ca.pem verify required"
	return haproxyGlobal + fmt.Sprintf(`frontend http
  bind :%d %s
  default_backend http
backend http
  server app %s:%d
frontend tcp
  bind :%d %s
  default_backend tcp
backend tcp
  server app %s:%d
`, haproxyTLSHTTP, tls, appIP, kubetest.EchoHTTPPort, haproxyTLSTCP, tls, appIP, 9000)
}

// haproxyClientConfig takes plaintext connections and carries each over
// mutual TLS to the server side at serverIP, checking its name.
func haproxyClientConfig(serverIP string) string {
	tls := "ssl crt /etc/haproxy/certs/client.pem ca-file /etc/haproxy/certs/ca.pem verify required verifyhost haproxy-server"
	return haproxyGlobal + fmt.Sprintf(`frontend http
  bind :%d
  default_backend http
backend http
  server tunnel %s:%d %s
frontend tcp
  bind :%d
  default_backend tcp
backend tcp
  server tunnel %s:%d %s
`, haproxyHTTPPort, serverIP, haproxyTLSHTTP, tls, haproxyTCPPort, serverIP, haproxyTLSTCP, tls)
}

// haproxyConfigDir is where haproxyPod mounts its configuration: a process
// is told by its config file's name in its command line (haproxyCPUSeconds).
const haproxyConfigDir = "/etc/haproxy/config/"

// haproxyPod runs haproxy in the foreground on node with config, as the
// file haproxyConfigDir+name+".cfg", and the certificates in the Secret
// "haproxy-certs" if there is one.
func haproxyPod(tb testing.TB, env *kubetest.Env, ns, name, node, config string, port int) *corev1.Pod {
	tb.Helper()
	ctx := context.Background()
	if _, err := env.Client.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Data:       map[string]string{name + ".cfg": config},
	}, metav1.CreateOptions{}); err != nil {
		tb.Fatal(err)
	}
	p := onNode(&corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{
				Name: "haproxy", Image: "haproxy",
				// -db: foreground, logs to stderr.
				Args: []string{"-db", "-f", haproxyConfigDir + name + ".cfg"},
				ReadinessProbe: &corev1.Probe{
					ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt(port)}},
					PeriodSeconds: 1,
				},
				VolumeMounts: []corev1.VolumeMount{
					{Name: "config", MountPath: haproxyConfigDir, ReadOnly: true},
					{Name: "certs", MountPath: "/etc/haproxy/certs", ReadOnly: true},
				},
			}},
			Volumes: []corev1.Volume{
				{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: name}}}},
				{Name: "certs", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "haproxy-certs", Optional: ptr(true)}}},
			},
			TerminationGracePeriodSeconds: ptr(int64(1)),
		},
	}, node)
	env.CreatePod(tb, p)
	return env.WaitPodReady(tb, ns, name, 30*time.Second)
}

// setupHaproxyPair starts the pair in ns in front of the app at appIP (on
// node2) and returns the client side's pod IP (on node1).
func setupHaproxyPair(tb testing.TB, env *kubetest.Env, ns, appIP string) string {
	tb.Helper()
	ca, server, client := haproxyCerts(tb)
	if _, err := env.Client.CoreV1().Secrets(ns).Create(context.Background(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "haproxy-certs"},
		Data:       map[string][]byte{"ca.pem": ca, "server.pem": server, "client.pem": client},
	}, metav1.CreateOptions{}); err != nil {
		tb.Fatal(err)
	}
	srv := haproxyPod(tb, env, ns, "haproxy-server", "node2", haproxyServerConfig(appIP), haproxyTLSHTTP)
	cli := haproxyPod(tb, env, ns, "haproxy-client", "node1", haproxyClientConfig(srv.Status.PodIP), haproxyHTTPPort)
	return cli.Status.PodIP
}

// haproxyRelayConfig relays plain TCP on the echo server's ports to the app
// at appIP.
func haproxyRelayConfig(appIP string) string {
	return haproxyGlobal + fmt.Sprintf(`frontend http
  bind :%d
  default_backend http
backend http
  server app %s:%d
frontend tcp
  bind :%d
  default_backend tcp
backend tcp
  server app %s:%d
`, kubetest.EchoHTTPPort, appIP, kubetest.EchoHTTPPort, haproxyTCPPort, appIP, 9000)
}

// setupHaproxyRelay starts a plain TCP relay in ns on the app's node (node2)
// in front of the app at appIP and returns the relay's pod IP.
func setupHaproxyRelay(tb testing.TB, env *kubetest.Env, ns, appIP string) string {
	tb.Helper()
	return haproxyPod(tb, env, ns, "haproxy-relay", "node2", haproxyRelayConfig(appIP), kubetest.EchoHTTPPort).Status.PodIP
}
