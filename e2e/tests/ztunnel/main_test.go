//go:build e2e

// Package ztunnel is the end-to-end suite of the data plane: istiod-lite, the
// CNI agent and ztunnel installed from deploy/; enrolled pods on the same and
// on different nodes talk through HBONE with mutual TLS, and L4 policy applies.
package ztunnel

import (
	"context"
	"testing"
	"time"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

func TestMain(m *testing.M) {
	kubetest.MainWith(m, func(env *kubetest.Env) error {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		return env.InstallMesh(ctx)
	})
}
