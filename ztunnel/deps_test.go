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

// kubectlPlugin is the one package of the module the rule does not apply
// to: the kubectl plugin (`kubectl ztunnel`) runs on an operator's machine,
// never in ztunnel, and needs the client to find ztunnel's pods and
// port-forward to their admin port. It is a command (package main), so no
// other package can import it and inherit the exception.
const kubectlPlugin = "github.com/ambient-mesh/ambient/ztunnel/cmd/kubectl-ztunnel"

// exempt reports whether the rule skips a package of the module (and its
// tests): only the kubectl plugin itself, not a package next to or below it.
func exempt(importPath string) bool { return importPath == kubectlPlugin }

// forbiddenInBinary are dependencies ztunnel's binary must not link, though
// its tests may. ztunnel's resident memory is mostly its executable's code
// and data faulted in, and every linked package is touched at start-up and
// by the garbage collector. go-control-plane (with cncf/xds and
// protoc-gen-validate) added megabytes for the five messages of delta xDS,
// which api/xds now describes; cilium/ebpf (with its BTF and ELF code) was
// there only to put two sockets into a pinned SOCKMAP, which
// bpf/redirect/sockmap now does with bpf(2). Tests use both: the eBPF
// engine to attach the program ztunnel's sockets serve.
var forbiddenInBinary = []string{
	"github.com/envoyproxy/go-control-plane",
	"github.com/cilium/ebpf",
}

// forbidden reports whether an import path belongs to a forbidden module.
func forbidden(importPath string) bool { return inModules(importPath, forbiddenModules) }

// forbiddenForBinary reports whether an import path belongs to a module the
// binary must not link.
func forbiddenForBinary(importPath string) bool { return inModules(importPath, forbiddenInBinary) }

// inModules reports whether an import path belongs to one of modules.
func inModules(importPath string, modules []string) bool {
	for _, m := range modules {
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

func TestForbiddenForBinaryMatchesWholePathElements(t *testing.T) {
	tests := []struct {
		name       string
		importPath string
		want       bool
	}{
		{"a go-control-plane package is forbidden", "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3", true},
		{"cilium/ebpf itself is forbidden", "github.com/cilium/ebpf", true},
		{"a cilium/ebpf subpackage is forbidden", "github.com/cilium/ebpf/btf", true},
		{"a module whose name only starts like cilium/ebpf is allowed", "github.com/cilium/ebpfx", false},
		{"our socket registration is allowed", "github.com/ambient-mesh/ambient/bpf/redirect/sockmap", false},
		{"our delta xDS messages are allowed", "github.com/ambient-mesh/ambient/api/xds", false},
		{"the Kubernetes client is not this list's business", "k8s.io/client-go", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := forbiddenForBinary(tt.importPath); got != tt.want {
				t.Errorf("forbiddenForBinary(%q) = %v, want %v", tt.importPath, got, tt.want)
			}
		})
	}
}

func TestExemptIsTheKubectlPluginAlone(t *testing.T) {
	tests := []struct {
		name       string
		importPath string
		want       bool
	}{
		{"the kubectl plugin is exempt", kubectlPlugin, true},
		{"the ztunnel binary is not", "github.com/ambient-mesh/ambient/ztunnel/cmd/ztunnel", false},
		{"a package below the plugin is not", kubectlPlugin + "/internal/kube", false},
		{"a package whose name only starts like the plugin's is not", kubectlPlugin + "-extra", false},
		{"ztunnel's libraries are not", "github.com/ambient-mesh/ambient/ztunnel/internal/proxy", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := exempt(tt.importPath); got != tt.want {
				t.Errorf("exempt(%q) = %v, want %v", tt.importPath, got, tt.want)
			}
		})
	}
}

// goList runs go list with args and returns its output. go test puts its
// own GOROOT/bin first on PATH, so this is the same go; the test runs in the
// module root, so ./... is this module's packages, resolved in workspace
// mode when a go.work is in effect.
func goList(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command("go", append([]string{"list"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}

// modulePackages returns the module's packages and their names.
func modulePackages(t *testing.T) map[string]string {
	t.Helper()
	pkgs := map[string]string{}
	for line := range strings.Lines(goList(t, "-f", "{{.ImportPath}} {{.Name}}", "./...")) {
		if path, name, ok := strings.Cut(strings.TrimSpace(line), " "); ok {
			pkgs[path] = name
		}
	}
	if len(pkgs) == 0 {
		t.Fatal("go list printed no packages; the check would pass vacuously")
	}
	return pkgs
}

// TestTheKubectlPluginIsTheOnlyException checks the exception against the
// module as it is: it covers exactly one package, the plugin, which is a
// command and still needs the client (else the exception should go).
func TestTheKubectlPluginIsTheOnlyException(t *testing.T) {
	pkgs := modulePackages(t)
	var exempted []string
	for path := range pkgs {
		if exempt(path) {
			exempted = append(exempted, path)
		}
	}
	slices.Sort(exempted)
	if !slices.Equal(exempted, []string{kubectlPlugin}) {
		t.Fatalf("packages exempt from the rule: %q, want only %s", exempted, kubectlPlugin)
	}
	if name := pkgs[kubectlPlugin]; name != "main" {
		t.Errorf("%s is package %s, want main: a library could be imported by ztunnel", kubectlPlugin, name)
	}
	linked := false
	for dep := range strings.Lines(goList(t, "-deps", kubectlPlugin)) {
		linked = linked || forbidden(strings.TrimSpace(dep))
	}
	if !linked {
		t.Errorf("%s no longer links the Kubernetes client: drop the exception", kubectlPlugin)
	}
}

// checkedPackages returns the module's packages but the exempt kubectl
// plugin, making sure the ztunnel binary is among them.
func checkedPackages(t *testing.T) []string {
	t.Helper()
	var checked []string
	for path := range modulePackages(t) {
		if !exempt(path) {
			checked = append(checked, path)
		}
	}
	slices.Sort(checked)
	// The ztunnel binary must stay under the rules whatever the exception.
	if !slices.Contains(checked, "github.com/ambient-mesh/ambient/ztunnel/cmd/ztunnel") {
		t.Fatalf("the ztunnel binary is not among the packages checked: %q", checked)
	}
	return checked
}

// TestZtunnelNeverLinksTheKubernetesClient lists every package the module's
// packages (but the kubectl plugin) and their tests depend on and fails on
// any forbidden one, naming the packages that import it.
func TestZtunnelNeverLinksTheKubernetesClient(t *testing.T) {
	out := goList(t, append([]string{"-deps", "-test",
		"-f", "{{.ImportPath}}{{range .Imports}} {{.}}{{end}}"}, checkedPackages(t)...)...)
	reportForbidden(t, out, forbidden, forbiddenModules)
}

// TestTheZtunnelBinaryLinksNeitherGoControlPlaneNorCiliumEBPF lists every
// package the module's packages (but the kubectl plugin) depend on, without
// their tests, so the binary and any library it may come to import, and
// fails on a package of forbiddenInBinary.
func TestTheZtunnelBinaryLinksNeitherGoControlPlaneNorCiliumEBPF(t *testing.T) {
	out := goList(t, append([]string{"-deps",
		"-f", "{{.ImportPath}}{{range .Imports}} {{.}}{{end}}"}, checkedPackages(t)...)...)
	reportForbidden(t, out, forbiddenForBinary, forbiddenInBinary)
}

// reportForbidden reads go list lines of "package imports..." and fails on
// every package for which isForbidden holds, naming the allowed packages that
// import it, which is where a fix has to start.
func reportForbidden(t *testing.T, out string, isForbidden func(string) bool, modules []string) {
	t.Helper()
	importers := map[string][]string{}
	listed := 0
	for line := range strings.Lines(out) {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		listed++
		pkg, imports := fields[0], fields[1:]
		if isForbidden(pkg) {
			if _, ok := importers[pkg]; !ok {
				importers[pkg] = nil
			}
			continue
		}
		for _, imp := range imports {
			if isForbidden(imp) && !slices.Contains(importers[imp], pkg) {
				importers[imp] = append(importers[imp], pkg)
			}
		}
	}
	if listed == 0 {
		t.Fatal("go list printed no packages; the check would pass vacuously")
	}
	// Forbidden packages imported only by other forbidden ones come along
	// with the first; they are counted, not named.
	below := 0
	for _, pkg := range slices.Sorted(maps.Keys(importers)) {
		if len(importers[pkg]) == 0 {
			below++
			continue
		}
		t.Errorf("ztunnel depends on %s (imported by %s)", pkg, strings.Join(importers[pkg], ", "))
	}
	if below > 0 {
		t.Errorf("and on %d more packages of %s that those import", below, strings.Join(modules, " and "))
	}
}
