//go:build e2e

package istiod

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

func TestPoliciesAreServedInTheirL4Form(t *testing.T) {
	env := kubetest.Get(t)
	ctx := context.Background()
	ns := env.Namespace(t, map[string]string{"istio.io/dataplane-mode": "ambient"})
	w := watch(t, env, istiodAddr(t, env), token(t, env, ns, "default", caAudience, nil), "test~"+ns)

	manifest := fmt.Sprintf(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: %[1]s}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {namespaces: [frontend]}}]
    to: [{operation: {ports: ["8080"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get-only, namespace: %[1]s}
spec:
  action: ALLOW
  rules:
  - to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: %[1]s}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/%[1]s/sa/intruder"]}}]
    to: [{operation: {paths: ["/admin"]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: %[1]s}
spec:
  mtls: {mode: STRICT}
`, ns)
	cmd := env.KubectlCmd(ctx, "apply", "-f", "-")
	cmd.Stdin = strings.NewReader(manifest)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("applying policies: %v\n%s", err, out)
	}

	get := func(name string) *security.Authorization {
		var a *security.Authorization
		env.WaitFor(t, 10*time.Second, "authorization "+name, func(context.Context) (bool, error) {
			a = w.authorization(name)
			return a != nil, nil
		})
		return a
	}
	t.Run("a selector ALLOW keeps its L4 rule", func(t *testing.T) {
		a := get(ns + "/allow-frontend")
		if a.GetAction() != security.Action_ALLOW || a.GetScope() != security.Scope_WORKLOAD_SELECTOR || len(a.GetRules()) != 1 {
			t.Errorf("got %v", a)
		}
	})
	t.Run("an ALLOW with only L7 rules loses them and so allows nothing", func(t *testing.T) {
		a := get(ns + "/allow-get-only")
		if a.GetAction() != security.Action_ALLOW || a.GetScope() != security.Scope_NAMESPACE || len(a.GetRules()) != 0 {
			t.Errorf("got %v", a)
		}
		env.WaitFor(t, 10*time.Second, "a status condition on allow-get-only", func(ctx context.Context) (bool, error) {
			out, err := env.RunKubectl(ctx, "get", "authorizationpolicy", "-n", ns, "allow-get-only", "-o", "json")
			if err != nil {
				return false, nil
			}
			var obj struct {
				Status struct {
					Conditions []struct{ Type, Status, Reason, Message string } `json:"conditions"`
				} `json:"status"`
			}
			json.Unmarshal([]byte(out), &obj)
			for _, c := range obj.Status.Conditions {
				if strings.Contains(c.Message, "methods") {
					return true, nil
				}
			}
			return false, nil
		})
	})
	t.Run("a DENY keeps its L4 part without the L7 fields", func(t *testing.T) {
		a := get(ns + "/deny-admin")
		if a.GetAction() != security.Action_DENY || len(a.GetRules()) != 1 {
			t.Errorf("got %v", a)
		}
	})
	t.Run("STRICT PeerAuthentication becomes a deny of plaintext", func(t *testing.T) {
		var found *security.Authorization
		env.WaitFor(t, 10*time.Second, "the converted PeerAuthentication", func(context.Context) (bool, error) {
			for name := range w.Resources(security.AuthorizationTypeURL) {
				if strings.HasPrefix(name, ns+"/") && strings.Contains(name, "peer_authentication") {
					found = w.authorization(name)
					return true, nil
				}
			}
			return false, nil
		})
		if found.GetAction() != security.Action_DENY {
			t.Errorf("got %v", found)
		}
	})
}
