// Package ztunnel_test holds module-wide checks on the ztunnel module.
package ztunnel_test

import (
	"bytes"
	"maps"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// forbiddenModules are dependencies ztunnel must never link. ztunnel runs on
// every node and learns everything it needs over xDS and ZDS; the Kubernetes
// client stack would add megabytes, memory and API-server credentials to it.
var forbiddenModules = []string{
	"k8s.io/client-go",
	"k8s.io/apimachinery",
}

// forbidden reports whether an import path belongs to a forbidden module.
func forbidden(importPath string) bool {
	for _, m := range forbiddenModules {
		if importPath == m || strings.HasPrefix(importPath, m+"/") {
			return true
		}
	}
	return false
}

func TestForbiddenMatchesWholePathElements(t *testing.T) {
	tests := []struct {
		name       string
		importPath string
		want       bool
	}{
		{"client-go itself is forbidden", "k8s.io/client-go", true},
		{"a client-go subpackage is forbidden", "k8s.io/client-go/kubernetes", true},
		{"an apimachinery subpackage is forbidden", "k8s.io/apimachinery/pkg/types", true},
		{"a module whose name only starts like client-go is allowed", "k8s.io/client-gone", false},
		{"the standard library is allowed", "net/http", false},
		{"our wire types are allowed", "github.com/ambient-mesh/ambient/api/workloadapi", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := forbidden(tt.importPath); got != tt.want {
				t.Errorf("forbidden(%q) = %v, want %v", tt.importPath, got, tt.want)
			}
		})
	}
}

// TestZtunnelNeverLinksTheKubernetesClient lists every package the module's
// packages and tests depend on and fails on any forbidden one, naming the
// packages that import it.
func TestZtunnelNeverLinksTheKubernetesClient(t *testing.T) {
	// go test puts its own GOROOT/bin first on PATH, so this is the same go.
	// The test runs in the module root, so ./... is this module's packages,
	// resolved in workspace mode when a go.work is in effect.
	cmd := exec.Command("go", "list", "-deps", "-test",
		"-f", "{{.ImportPath}}{{range .Imports}} {{.}}{{end}}", "./...")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps -test ./...: %v\n%s", err, stderr.String())
	}

	// importers maps each forbidden package in the graph to the allowed
	// packages that import it, which is where a fix has to start.
	importers := map[string][]string{}
	listed := 0
	for line := range strings.Lines(string(out)) {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		listed++
		pkg, imports := fields[0], fields[1:]
		if forbidden(pkg) {
			if _, ok := importers[pkg]; !ok {
				importers[pkg] = nil
			}
			continue
		}
		for _, imp := range imports {
			if forbidden(imp) && !slices.Contains(importers[imp], pkg) {
				importers[imp] = append(importers[imp], pkg)
			}
		}
	}
	if listed == 0 {
		t.Fatal("go list printed no packages; the check would pass vacuously")
	}
	for _, pkg := range slices.Sorted(maps.Keys(importers)) {
		t.Errorf("ztunnel depends on %s (imported by %s)", pkg, strings.Join(importers[pkg], ", "))
	}
}
