// Package cniapi is the contract between the ambient-cni plugin and the node
// agent: JSON over HTTP on a unix socket. The plugin posts one PodRequest
// per CNI command; the agent decides whether the pod is ambient and answers
// with a Response, or with an error status and a message the plugin passes
// on to the container runtime.
package cniapi

import (
	"errors"
	"fmt"
	"net/netip"
)

// DefaultSocketPath is where the node agent serves the plugin.
const DefaultSocketPath = "/var/run/ambient/cni.sock"

// Paths of the agent's endpoints.
const (
	PathAdd    = "/v1/cni/add"    // POST PodRequest: enroll the pod if it is ambient
	PathDel    = "/v1/cni/del"    // POST PodRequest: unenroll it
	PathCheck  = "/v1/cni/check"  // POST PodRequest: is redirection in place?
	PathStatus = "/v1/cni/status" // GET: is the agent ready to enroll pods?
)

// PodRequest is what the plugin knows about a pod: the CNI arguments, the
// Kubernetes identity from CNI_ARGS, and the addresses the primary plugin
// assigned (from prevResult).
type PodRequest struct {
	ContainerID string `json:"containerID"`
	// Netns is the path of the pod's network namespace; empty or gone on a
	// late DEL.
	Netns  string `json:"netns"`
	IfName string `json:"ifName,omitempty"`

	PodName      string `json:"podName"`
	PodNamespace string `json:"podNamespace"`
	// PodUID is K8S_POD_UID. Runtimes that do not pass it leave it empty;
	// the agent then finds the pod by namespace and name.
	PodUID string `json:"podUID,omitempty"`
	// SandboxID is K8S_POD_INFRA_CONTAINER_ID (the pod sandbox), which
	// containerd and CRI-O pass; usually equal to ContainerID.
	SandboxID string `json:"sandboxID,omitempty"`

	// IPs are the pod's addresses from prevResult, in its order.
	IPs []netip.Addr `json:"ips,omitempty"`
}

// Validate checks the fields the agent needs for op (one of the Path*
// constants); ADD and CHECK need a netns, DEL tolerates its absence.
func (r *PodRequest) Validate(op string) error {
	var missing []string
	if r.ContainerID == "" {
		missing = append(missing, "containerID")
	}
	if r.PodName == "" {
		missing = append(missing, "podName")
	}
	if r.PodNamespace == "" {
		missing = append(missing, "podNamespace")
	}
	if r.Netns == "" && op != PathDel {
		missing = append(missing, "netns")
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: missing %v", ErrInvalidRequest, missing)
	}
	return nil
}

// String names the pod for messages.
func (r *PodRequest) String() string {
	return r.PodNamespace + "/" + r.PodName
}

// Outcome is what the agent did for a pod.
type Outcome string

const (
	// Enrolled: redirection is installed and ztunnel acknowledged the pod
	// (ADD), or both are still in place (CHECK).
	Enrolled Outcome = "enrolled"
	// Skipped: the pod is not ambient (or is host-network or mesh
	// infrastructure); nothing was done and the CNI command passes.
	Skipped Outcome = "skipped"
	// Removed: the pod's redirection and ztunnel state are gone (DEL).
	Removed Outcome = "removed"
	// Ready: the agent can enroll pods (STATUS).
	Ready Outcome = "ready"
)

// Response is the agent's answer. On an error status, Error says why.
type Response struct {
	Outcome Outcome `json:"outcome,omitempty"`
	Message string  `json:"message,omitempty"`
	Error   string  `json:"error,omitempty"`
}

var (
	// ErrUnreachable: the agent's socket could not be reached (agent not
	// running yet, or restarting). The runtime should retry.
	ErrUnreachable = errors.New("node agent unreachable")
	// ErrUnavailable: the agent is up but cannot enroll now, say because no
	// ztunnel is connected. The runtime should retry. Agent code returns
	// errors wrapping it to answer 503.
	ErrUnavailable = errors.New("unavailable")
	// ErrInvalidRequest: the request lacks what the agent needs. Agent code
	// returns errors wrapping it to answer 400.
	ErrInvalidRequest = errors.New("invalid request")
)

// AgentError is an error answer from the agent.
type AgentError struct {
	Path       string
	StatusCode int
	Message    string
}

func (e *AgentError) Error() string {
	return fmt.Sprintf("node agent answered %s with %d: %s", e.Path, e.StatusCode, e.Message)
}

// Is makes errors.Is match ErrUnavailable and ErrInvalidRequest from the
// status code.
func (e *AgentError) Is(target error) bool {
	switch target {
	case ErrUnavailable:
		return e.StatusCode == 503
	case ErrInvalidRequest:
		return e.StatusCode == 400
	}
	return false
}
