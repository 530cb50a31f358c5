// Package nsexec starts a process inside a network namespace, optionally with a
// private mount namespace holding bind mounts, the way a container runtime's init
// step does. The calling binary re-executes itself: Command builds an exec.Cmd
// that runs /proc/self/exe with the spec in the environment, and Init, called at
// the very top of main, recognises that environment, enters the namespaces on a
// locked OS thread and execs the target, so the Go runtime's other threads never
// see a namespace switch.
package nsexec

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
)

// envSpec carries the JSON-encoded Spec from Command to Init.
const envSpec = "AMBIENT_NSEXEC_SPEC"

// Mount is one bind mount applied in the child's private mount namespace.
type Mount struct {
	Source   string `json:"source"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"readOnly,omitempty"`
}

// Spec says which namespaces the child enters before it execs Argv.
type Spec struct {
	// NetNS is the path of a network namespace file to join; empty keeps the
	// caller's network namespace.
	NetNS string `json:"netns,omitempty"`
	// PrivateMounts gives the child its own mount namespace (propagation
	// private) in which Mounts are applied. Targets must already exist.
	PrivateMounts bool    `json:"privateMounts,omitempty"`
	Mounts        []Mount `json:"mounts,omitempty"`
	// Capabilities, when non-nil, is the capability bounding set the child
	// keeps (names like "CAP_NET_ADMIN"); every other capability is dropped
	// from the bounding set before exec. Nil keeps all capabilities.
	Capabilities []string `json:"capabilities"`
	// Hostname, when set, gives the child its own UTS namespace with this
	// host name, as a pod's containers have.
	Hostname string `json:"hostname,omitempty"`
	// Argv is the program and its arguments. Argv[0] must be a path.
	Argv []string `json:"argv"`
}

// ErrNoArgv is returned when a Spec names no program.
var ErrNoArgv = errors.New("nsexec: empty argv")

// Command returns a command that runs spec.Argv inside the namespaces spec
// names. The caller sets Env, Dir, Stdout, Stderr and SysProcAttr as for any
// exec.Cmd; Env must not be nil-shared with another command because the spec is
// appended to it.
func Command(spec Spec) (*exec.Cmd, error) {
	return CommandVia("/proc/self/exe", spec)
}

// CommandVia is Command with another binary doing the entering: one whose
// main calls Init first, such as the small cmd/nsexec, which starts far
// faster than a large binary re-executing itself.
func CommandVia(helper string, spec Spec) (*exec.Cmd, error) {
	if len(spec.Argv) == 0 {
		return nil, ErrNoArgv
	}
	raw, err := json.Marshal(spec)
	if err != nil {
		return nil, fmt.Errorf("encoding nsexec spec: %w", err)
	}
	cmd := exec.Command(helper)
	cmd.Args = []string{spec.Argv[0]}
	cmd.Env = []string{envSpec + "=" + string(raw)}
	return cmd, nil
}

// SetEnv sets the child's environment, keeping the spec variable Command added.
func SetEnv(cmd *exec.Cmd, env []string) {
	var spec string
	for _, kv := range cmd.Env {
		if len(kv) > len(envSpec) && kv[:len(envSpec)+1] == envSpec+"=" {
			spec = kv
		}
	}
	cmd.Env = append(append([]string(nil), env...), spec)
}

// Init must be the first call in main of every binary that uses Command. In a
// normal start it returns at once. In a child started by Command it enters the
// namespaces and execs the target; it never returns then, and on error it
// prints the reason and exits with status 127.
func Init() {
	raw, ok := os.LookupEnv(envSpec)
	if !ok {
		return
	}
	var spec Spec
	if err := json.Unmarshal([]byte(raw), &spec); err != nil {
		fail(fmt.Errorf("decoding nsexec spec: %w", err))
	}
	os.Unsetenv(envSpec)
	fail(enterAndExec(spec))
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "nsexec: %v\n", err)
	os.Exit(127)
}
