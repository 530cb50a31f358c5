//go:build e2e

// Package localcluster is the end-to-end suite of the local cluster itself:
// pods on two nodes, Services through kube-proxy, the kubelet API behind
// kubectl logs/exec/port-forward, pod teardown and restarts, and bad input.
package localcluster

import (
	"testing"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

func TestMain(m *testing.M) { kubetest.Main(m) }
