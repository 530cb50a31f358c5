package kubeletapi

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
)

// listenInPod starts an upper-casing echo server on 127.0.0.1 inside the
// network namespace at netns and returns its port.
func listenInPod(t *testing.T, netns string) int {
	t.Helper()
	var ln net.Listener
	err := ns.WithNetNSPath(netns, func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp4", "127.0.0.1:0")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					fmt.Fprintf(c, "%s\n", strings.ToUpper(sc.Text()))
				}
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

type dialerKind struct {
	name string
	make func(t *testing.T, e *testEnv, u *url.URL) httpstream.Dialer
}

// dialers are the ways the apiserver forwards ports to a kubelet: SPDY, and
// SPDY tunneled in a websocket when the node declares
// ExtendWebSocketsToKubelet.
var dialers = []dialerKind{
	{"spdy", func(t *testing.T, e *testEnv, u *url.URL) httpstream.Dialer {
		rt, up, err := spdy.RoundTripperFor(e.restConfig())
		if err != nil {
			t.Fatal(err)
		}
		return spdy.NewDialer(up, &http.Client{Transport: rt}, "POST", u)
	}},
	{"websocket tunnel", func(t *testing.T, e *testEnv, u *url.URL) httpstream.Dialer {
		d, err := portforward.NewSPDYOverWebsocketDialer(u, e.restConfig())
		if err != nil {
			t.Fatal(err)
		}
		return d
	}},
}

func TestPortForwardReachesThePodsLoopback(t *testing.T) {
	if !canUnshare(t) {
		t.Skip("needs root with unshare and nsenter")
	}
	env := newTestEnv(t)
	pid := startContainer(t, true)
	netns := fmt.Sprintf("/proc/%d/ns/net", pid)
	if out, err := exec.Command("nsenter", "--target", strconv.Itoa(pid), "--net", "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("bringing up lo: %v: %s", err, out)
	}
	env.rt.set(func(f *fakeRuntime) { f.netns = netns })
	podPort := listenInPod(t, netns)
	// The same port on the host's loopback must not be what answers.
	if c, err := net.DialTimeout("tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(podPort)), time.Second); err == nil {
		c.Close()
		t.Logf("port %d is also open on the host; the test still tells them apart by the reply", podPort)
	}

	for _, kind := range dialers {
		t.Run(kind.name, func(t *testing.T) {
			u := &url.URL{Scheme: "https", Host: env.addr, Path: "/portForward/default/web"}
			stop, ready := make(chan struct{}), make(chan struct{})
			fw, err := portforward.NewOnAddresses(kind.make(t, env, u), []string{"127.0.0.1"}, []string{fmt.Sprintf("0:%d", podPort)}, stop, ready, io.Discard, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- fw.ForwardPorts() }()
			select {
			case <-ready:
			case err := <-done:
				t.Fatalf("ForwardPorts: %v", err)
			case <-time.After(10 * time.Second):
				t.Fatal("port-forward not ready")
			}
			ports, err := fw.GetPorts()
			if err != nil {
				t.Fatal(err)
			}
			// Two connections in turn over the one forwarding session.
			for i := range 2 {
				c, err := net.Dial("tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(ports[0].Local))))
				if err != nil {
					t.Fatal(err)
				}
				c.SetDeadline(time.Now().Add(10 * time.Second))
				fmt.Fprintf(c, "hello %d\n", i)
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil || line != fmt.Sprintf("HELLO %d\n", i) {
					t.Errorf("connection %d read %q, %v", i, line, err)
				}
				c.Close()
			}
			close(stop)
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("ForwardPorts: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Error("port-forward did not stop")
			}
		})
	}
}

func TestPortForwardToAnUnknownPodIsNotFound(t *testing.T) {
	env := newTestEnv(t)
	u := &url.URL{Scheme: "https", Host: env.addr, Path: "/portForward/default/nope"}
	rt, up, err := spdy.RoundTripperFor(env.restConfig())
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = spdy.NewDialer(up, &http.Client{Transport: rt}, "POST", u).Dial(portforward.PortForwardProtocolV1Name)
	if err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("dial: %v, want not found", err)
	}
}
