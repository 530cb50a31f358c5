// Command kube is the Kubernetes control plane of the local test cluster as one
// multi-call binary: kube-apiserver, kube-controller-manager, kube-scheduler,
// kube-proxy and kubectl, built from the k8s.io/kubernetes module. The four
// share most of their code, so linking them once saves three quarters of the link
// time and disk of four separate builds.
//
// It picks the program by the name it was started as (a symlink named
// kube-apiserver) or, failing that, by its first argument (kube kube-apiserver ...).
// Each program's main is copied from k8s.io/kubernetes/cmd/<name>/<name>.go.
package main

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	_ "time/tzdata" // CronJob time zones, as upstream kube-apiserver and kube-controller-manager

	_ "k8s.io/client-go/plugin/pkg/client/auth" // kubectl's exec and oidc credential plugins
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"          // --logging-format=json
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // kubernetes_build_info metric
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

// programs maps each program name to its main, which returns the exit code.
// Commands are built inside each func so that only the chosen one runs its setup.
var programs = map[string]func() int{
	"kube-apiserver":          func() int { return cli.Run(apiserver.NewAPIServerCommand()) },
	"kube-controller-manager": func() int { return cli.Run(controllermanager.NewControllerManagerCommand()) },
	"kube-scheduler":          func() int { return cli.Run(scheduler.NewSchedulerCommand()) },
	"kube-proxy":              func() int { return cli.Run(proxy.NewProxyCommand()) },
	"kubectl":                 runKubectl,
}

func runKubectl() int {
	logs.GlogSetter(kubectl.GetLogVerbosity(os.Args)) //nolint:errcheck // as upstream
	if err := cli.RunNoErrOutput(kubectl.NewDefaultKubectlCommand()); err != nil {
		kubectlutil.CheckErr(err) // prints the error and exits non-zero
	}
	return 0
}

func main() {
	run, ok := programs[filepath.Base(os.Args[0])]
	if !ok && len(os.Args) > 1 {
		if run, ok = programs[os.Args[1]]; ok {
			// Shift so the program sees itself as argv[0]: cobra parses os.Args[1:],
			// and kubectl looks up plugins from os.Args.
			os.Args = os.Args[1:]
		}
	}
	if !ok {
		names := slices.Sorted(maps.Keys(programs))
		fmt.Fprintf(os.Stderr, "usage: kube {%s} [flags]\n(or run through a symlink with one of those names)\n", strings.Join(names, "|"))
		os.Exit(2)
	}
	os.Exit(run())
}
