package nodelet

import (
	"fmt"
	"path/filepath"
	"strconv"

	"github.com/ambient-mesh/ambient/e2e/internal/kubeletapi"
)

// hostNetNS is what PodNetNS returns for host-network pods: nodelet runs in
// the node's namespace, so its own is the pod's.
const hostNetNS = "/proc/self/ns/net"

var _ kubeletapi.Runtime = (*Nodelet)(nil)

// ContainerLogPath returns the CRI log of a container's current run (the
// last one that ran, for a container waiting to restart) or of the run
// before it.
func (n *Nodelet) ContainerLogPath(namespace, pod, container string, previous bool) (string, error) {
	w := n.worker(namespace, pod)
	if w == nil {
		return "", fmt.Errorf("pod %s/%s: %w", namespace, pod, kubeletapi.ErrNotFound)
	}
	w.mu.Lock()
	c := w.containers[container]
	var ran bool
	var restarts int32
	if c != nil {
		ran, restarts = c.everRan, c.restartCount
	}
	w.mu.Unlock()
	switch {
	case c == nil:
		return "", fmt.Errorf("container %s in pod %s/%s: %w", container, namespace, pod, kubeletapi.ErrNotFound)
	case !ran:
		return "", fmt.Errorf("container %s in pod %s/%s is waiting to start: %w", container, namespace, pod, kubeletapi.ErrNotFound)
	case previous && restarts == 0:
		return "", fmt.Errorf("previous terminated container %s in pod %s/%s: %w", container, namespace, pod, kubeletapi.ErrNotFound)
	case previous:
		restarts--
	}
	return filepath.Join(n.podLogsDir(namespace, pod, string(w.uid)), container, strconv.Itoa(int(restarts))+".log"), nil
}

// ContainerPID returns the main pid of a running container.
func (n *Nodelet) ContainerPID(namespace, pod, container string) (int, error) {
	w := n.worker(namespace, pod)
	if w == nil {
		return 0, fmt.Errorf("pod %s/%s: %w", namespace, pod, kubeletapi.ErrNotFound)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	c := w.containers[container]
	if c == nil || c.proc == nil {
		return 0, fmt.Errorf("running container %s in pod %s/%s: %w", container, namespace, pod, kubeletapi.ErrNotFound)
	}
	return c.proc.pid, nil
}

// PodNetNS returns the pod's network namespace file.
func (n *Nodelet) PodNetNS(namespace, pod string) (string, error) {
	w := n.worker(namespace, pod)
	if w == nil {
		return "", fmt.Errorf("pod %s/%s: %w", namespace, pod, kubeletapi.ErrNotFound)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case w.hostNetwork:
		return hostNetNS, nil
	case w.sandboxReady && w.netns != "":
		return w.netns, nil
	}
	return "", fmt.Errorf("network namespace of pod %s/%s: %w", namespace, pod, kubeletapi.ErrNotFound)
}
