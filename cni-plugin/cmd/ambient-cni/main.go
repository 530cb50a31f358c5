// Command ambient-cni is the chained CNI plugin of the ambient mesh. The
// container runtime runs it after the node's primary plugin; it forwards the
// pod to the node agent (cni-agent), which decides whether the pod is
// ambient and, if so, installs redirection and hands the pod to ztunnel
// before ADD returns. See the component README for configuration.
package main

import (
	"os"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"
)

func main() {
	p := &plugin{stdout: os.Stdout, stderr: os.Stderr}
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    p.add,
		Del:    p.del,
		Check:  p.check,
		Status: p.status,
	}, version.All, "ambient-cni: enrolls pods in the ambient mesh through the node agent")
}
