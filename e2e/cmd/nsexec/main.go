// Command nsexec is the small launcher nodelet runs CNI plugins through: it
// enters the namespaces and bind mounts its environment describes (see
// package nsexec) and execs the plugin. Being tiny, it starts in about a
// millisecond, where re-executing nodelet itself would cost ten times that on
// every plugin call of every pod.
package main

import (
	"fmt"
	"os"

	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

func main() {
	nsexec.Init()
	fmt.Fprintln(os.Stderr, "nsexec: run by nodelet with a namespace spec in the environment; nothing to do")
	os.Exit(2)
}
