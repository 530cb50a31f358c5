package controller

import (
	"os"
	"testing"
)

func TestMain(m *testing.M) {
	// Istio's generated fake clientset cannot serve watch-list streams (the
	// reflector would wait for an initial-events bookmark forever); plain
	// list+watch is what it supports. The real apiserver serves both.
	os.Setenv("KUBE_FEATURE_WatchListClient", "false")
	os.Exit(m.Run())
}
