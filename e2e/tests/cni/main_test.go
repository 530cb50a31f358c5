//go:build e2e

// Package cni is the end-to-end suite of the CNI agent and plugin on the local
// cluster: labeling a namespace enrolls its running pods without restarts, new
// pods are enrolled before their containers start, redirected traffic reaches
// the node's ztunnel (here a stand-in that names what it received), and
// removing the label gives the pods back their direct path.
package cni

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
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		root := cluster.RepoRoot()
		for _, args := range [][]string{
			{"apply", "-f", filepath.Join(root, "deploy", "namespace.yaml")},
			{"apply", "-k", filepath.Join(root, "deploy", "cni-agent")},
			{"apply", "-f", filepath.Join(root, "e2e", "cluster", "ztunnel-standin.yaml")},
			{"-n", "istio-system", "rollout", "status", "daemonset/cni-agent", "--timeout=120s"},
			{"-n", "istio-system", "rollout", "status", "daemonset/ztunnel-standin", "--timeout=120s"},
		} {
			if out, err := env.RunKubectl(ctx, args...); err != nil {
				return fmt.Errorf("%w\n%s", err, out)
			}
		}
		return nil
	})
}
