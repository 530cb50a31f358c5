//go:build e2e

// Package istiod is the end-to-end suite of istiod-lite on the local cluster:
// installed from deploy/, it serves workload and policy state over delta xDS to
// our xDS client library and signs certificates, as ztunnel will use them.
package istiod

import (
	"context"
	"testing"
	"time"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

func TestMain(m *testing.M) {
	kubetest.MainWith(m, func(env *kubetest.Env) error {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		return env.InstallMesh(ctx)
	})
}
