//go:build e2e

package ztunnel

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

// ztunnelPods returns the names of the ztunnel pods not being deleted, by
// node.
func ztunnelPods(t *testing.T, env *kubetest.Env) map[string]string {
	t.Helper()
	pods, err := env.Client.CoreV1().Pods("istio-system").List(context.Background(), metav1.ListOptions{LabelSelector: "app=ztunnel"})
	if err != nil {
		t.Fatal(err)
	}
	byNode := map[string]string{}
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil {
			byNode[p.Spec.NodeName] = p.Name
		}
	}
	return byNode
}

// TestRollingRestartBreaksNoLongLivedConnection holds 1,000 connections
// from an enrolled pod, half to a pod on the other node and half to one on
// the same node, and restarts ztunnel on both nodes while they carry
// traffic: a request every two seconds on each. The new ztunnel takes the
// in-pod ports and socket maps over before the old one drains, so every
// request succeeds and no connection is opened a second time.
func TestRollingRestartBreaksNoLongLivedConnection(t *testing.T) {
	env := kubetest.Get(t)
	f := setup(t, env)
	const perTarget = 500
	// Long enough for both nodes to roll (a few seconds each), short enough
	// for the connections to end before the old ztunnels' 30 s drain
	// deadline.
	const hold = 25 * time.Second
	targets := []struct{ name, addr string }{
		{"other node", f.far.Status.PodIP + ":9000"},
		{"same node", f.near.Status.PodIP + ":9000"},
	}
	// Both ztunnels know the pods before the connections open, so that any
	// failure below is the restart's.
	for _, pod := range []string{"far", "near"} {
		ip := f.far.Status.PodIP
		if pod == "near" {
			ip = f.near.Status.PodIP
		}
		env.WaitFor(t, 30*time.Second, "a request to "+pod, func(context.Context) (bool, error) {
			out, err := get(t, env, f.ns, "client", fmt.Sprintf("%s:%d", ip, kubetest.EchoHTTPPort))
			return err == nil && strings.Contains(out, fmt.Sprintf(`"pod":%q`, pod)), nil
		})
	}
	before := ztunnelPods(t, env)
	if len(before) != 2 {
		t.Fatalf("ztunnel pods before the restart: %v, want one per node", before)
	}

	results := make([]loadResult, len(targets))
	errs := make([]error, len(targets))
	var loads sync.WaitGroup
	loadsDone := make(chan struct{})
	for i, tg := range targets {
		loads.Go(func() {
			results[i], errs[i] = load(env, f.ns, "client", "--mode", "tcp", "--target", tg.addr,
				"--connections", fmt.Sprint(perTarget), "--rate", fmt.Sprint(perTarget/2),
				"--duration", hold.String(), "--timeout", "5s")
		})
	}
	go func() {
		loads.Wait()
		close(loadsDone)
	}()
	// Every connection is opened by its first request, within two seconds
	// at this rate.
	time.Sleep(4 * time.Second)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	restartStart := time.Now()
	if out, err := env.RunKubectl(ctx, "-n", "istio-system", "rollout", "restart", "daemonset/ztunnel"); err != nil {
		t.Fatalf("rollout restart: %v\n%s", err, out)
	}
	// Rolled: on every node a new ztunnel is ready and the old one has been
	// told to leave (it drains the held connections from then on).
	var after map[string]string
	env.WaitFor(t, 30*time.Second, "a new ready ztunnel on every node and the old ones terminating", func(ctx context.Context) (bool, error) {
		pods, err := env.Client.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ztunnel"})
		if err != nil {
			return false, err
		}
		after = map[string]string{}
		for _, p := range pods.Items {
			old := slices.Contains(slices.Collect(maps.Values(before)), p.Name)
			switch {
			case old && p.DeletionTimestamp == nil:
				return false, nil
			case !old && p.DeletionTimestamp == nil && kubetest.PodReady(&p):
				after[p.Spec.NodeName] = p.Name
			}
		}
		return len(after) == len(before), nil
	})
	rolled := time.Since(restartStart)
	// Follow the old ztunnels' logs until they exit, to learn how their
	// drain ended.
	oldLogs := make(map[string]*strings.Builder)
	var following sync.WaitGroup
	for _, name := range before {
		var b strings.Builder
		oldLogs[name] = &b
		cmd := env.KubectlCmd(context.Background(), "-n", "istio-system", "logs", "-f", name)
		cmd.Stdout = &b
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		following.Go(func() {
			done := make(chan struct{})
			go func() { cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(60 * time.Second):
				cmd.Process.Kill()
				<-done
			}
		})
	}
	t.Logf("rolled %v -> %v in %v", before, after, rolled.Round(time.Millisecond))
	select {
	case <-loadsDone:
		t.Fatalf("the connections ended before the rollout did (%v): the restart was not under load; raise the hold time", rolled)
	default:
	}

	<-loadsDone
	loadsEnded := time.Now()
	for i, tg := range targets {
		r := results[i]
		if errs[i] != nil {
			t.Errorf("to the %s: %v", tg.name, errs[i])
			continue
		}
		t.Logf("to the %s: %d requests succeeded, %d failed %v, %d connections opened", tg.name, r.Succeeded, r.Failed, r.Errors, r.Dials)
		if r.Failed > 0 || r.Succeeded == 0 {
			t.Errorf("to the %s: %d requests failed (%v), %d succeeded", tg.name, r.Failed, r.Errors, r.Succeeded)
		}
		if r.Dials != perTarget {
			t.Errorf("to the %s: %d connections opened for %d held: %d broke and were opened again", tg.name, r.Dials, perTarget, r.Dials-perTarget)
		}
	}

	// The new ztunnels carry new connections, and the old ones are gone.
	out, err := get(t, env, f.ns, "client", fmt.Sprintf("%s:%d", f.far.Status.PodIP, kubetest.EchoHTTPPort))
	if err != nil {
		t.Fatalf("a new connection after the restart: %v\n%s", err, out)
	}
	// The old ztunnels leave as soon as their last connection has ended,
	// well before their drain deadline (30 s after SIGTERM).
	env.WaitFor(t, 20*time.Second, "the old ztunnels to exit once drained", func(ctx context.Context) (bool, error) {
		pods, err := env.Client.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ztunnel"})
		if err != nil {
			return false, err
		}
		for _, p := range pods.Items {
			if slices.Contains(slices.Collect(maps.Values(before)), p.Name) {
				return false, nil
			}
		}
		return true, nil
	})
	t.Logf("old ztunnels gone %v after the connections ended", time.Since(loadsEnded).Round(time.Millisecond))
	following.Wait()
	for name, b := range oldLogs {
		for _, line := range strings.Split(b.String(), "\n") {
			if strings.Contains(line, `"msg":"drain`) {
				t.Logf("%s: %s", name, line)
			}
		}
		if !strings.Contains(b.String(), `"msg":"drained"`) {
			t.Errorf("old ztunnel %s did not end its drain with every connection closed; its log ends:\n%s", name, tail(b.String(), 2000))
		}
	}
}

// tail returns the last n bytes of s.
func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[len(s)-n:]
}
