//go:build e2e

// Package ztunnel is the end-to-end suite of the data plane: istiod-lite, the
// CNI agent and ztunnel installed from deploy/; enrolled pods on the same and
// on different nodes talk through HBONE with mutual TLS, and L4 policy applies.
package ztunnel

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/ambient-mesh/ambient/e2e/internal/cluster"
	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

func TestMain(m *testing.M) {
	kubetest.MainWith(m, func(env *kubetest.Env) error {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		if err := env.InstallMesh(ctx); err != nil {
			return err
		}
		root := cluster.RepoRoot()
		for _, args := range [][]string{
			{"apply", "-k", filepath.Join(root, "deploy", "cni-agent")},
			{"apply", "-k", filepath.Join(root, "deploy", "ztunnel")},
			{"-n", "istio-system", "rollout", "status", "daemonset/cni-agent", "--timeout=120s"},
			{"-n", "istio-system", "rollout", "status", "daemonset/ztunnel", "--timeout=120s"},
		} {
			if out, err := env.RunKubectl(ctx, args...); err != nil {
				return fmt.Errorf("%w\n%s", err, out)
			}
		}
		return nil
	})
}
