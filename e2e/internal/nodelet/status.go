package nodelet

import (
	"fmt"
	"net"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Waiting reasons, as the kubelet reports them.
const (
	reasonContainerCreating          = "ContainerCreating"
	reasonPodInitializing            = "PodInitializing"
	reasonErrImagePull               = "ErrImagePull"
	reasonCrashLoopBackOff           = "CrashLoopBackOff"
	reasonCreateContainerConfigError = "CreateContainerConfigError"
	reasonCreateContainerError       = "CreateContainerError"
)

// Terminated reasons.
const (
	reasonCompleted  = "Completed"
	reasonError      = "Error"
	reasonStartError = "StartError"
)

// statusInput is what the runtime knows about a pod, in the shape the pure
// status functions need. Container statuses are in spec order.
type statusInput struct {
	SandboxReady bool
	PodIPs       []string
	HostIP       string
	StartTime    *metav1.Time
	Init         []corev1.ContainerStatus
	Regular      []corev1.ContainerStatus
	Now          metav1.Time
	// Phase, when set, overrides the phase the containers imply: the pod
	// already reached it (or is being deleted and ends in it).
	Phase corev1.PodPhase
}

// computeStatus returns the status the pod should have: base (the status the
// API server holds) with the fields the kubelet owns replaced. Conditions
// other parts of the system own (PodScheduled, readiness gates, DisruptionTarget)
// are kept, and a condition's lastTransitionTime only moves when its status
// does. A terminal phase is never left.
func computeStatus(pod *corev1.Pod, in statusInput) corev1.PodStatus {
	st := *pod.Status.DeepCopy()
	st.InitContainerStatuses = in.Init
	st.ContainerStatuses = in.Regular
	if st.StartTime == nil {
		st.StartTime = in.StartTime
	}
	if in.HostIP != "" {
		st.HostIP = in.HostIP
		st.HostIPs = []corev1.HostIP{{IP: in.HostIP}}
	}
	if len(in.PodIPs) > 0 {
		st.PodIP = in.PodIPs[0]
		st.PodIPs = make([]corev1.PodIP, len(in.PodIPs))
		for i, ip := range in.PodIPs {
			st.PodIPs[i] = corev1.PodIP{IP: ip}
		}
	}

	phase := podPhase(pod.Spec.RestartPolicy, pod.Spec.InitContainers, in.Init, in.Regular)
	if in.Phase != "" {
		phase = in.Phase
	}
	if isTerminal(pod.Status.Phase) {
		phase = pod.Status.Phase
	}
	st.Phase = phase

	initialized, notInit := initDone(pod.Spec.InitContainers, in.Init)
	var unready []string
	for _, cs := range in.Regular {
		if !cs.Ready {
			unready = append(unready, cs.Name)
		}
	}
	if len(in.Regular) < len(pod.Spec.Containers) {
		unready = nil
		for _, c := range pod.Spec.Containers {
			unready = append(unready, c.Name)
		}
	}

	conds := []corev1.PodCondition{
		boolCondition(corev1.PodReadyToStartContainers, in.SandboxReady, "", ""),
	}
	if initialized {
		conds = append(conds, boolCondition(corev1.PodInitialized, true, "", ""))
	} else {
		conds = append(conds, boolCondition(corev1.PodInitialized, false, "ContainersNotInitialized",
			fmt.Sprintf("containers with incomplete status: [%s]", strings.Join(notInit, " "))))
	}
	var containersReady corev1.PodCondition
	switch {
	case phase == corev1.PodSucceeded:
		containersReady = boolCondition(corev1.ContainersReady, false, "PodCompleted", "")
	case phase == corev1.PodFailed:
		containersReady = boolCondition(corev1.ContainersReady, false, "PodFailed", "")
	case len(unready) > 0:
		containersReady = boolCondition(corev1.ContainersReady, false, "ContainersNotReady",
			fmt.Sprintf("containers with unready status: [%s]", strings.Join(unready, " ")))
	default:
		containersReady = boolCondition(corev1.ContainersReady, true, "", "")
	}
	ready := containersReady
	ready.Type = corev1.PodReady
	if ready.Status == corev1.ConditionTrue {
		if msg := gatesNotReady(pod.Spec.ReadinessGates, pod.Status.Conditions); msg != "" {
			ready = boolCondition(corev1.PodReady, false, "ReadinessGatesNotReady", msg)
		}
	}
	conds = append(conds, ready, containersReady)
	st.Conditions = mergeConditions(pod.Status.Conditions, conds, in.Now)
	return st
}

func boolCondition(t corev1.PodConditionType, ok bool, reason, msg string) corev1.PodCondition {
	s := corev1.ConditionFalse
	if ok {
		s = corev1.ConditionTrue
	}
	return corev1.PodCondition{Type: t, Status: s, Reason: reason, Message: msg}
}

// gatesNotReady says why the pod's readiness gates hold it back, or "".
func gatesNotReady(gates []corev1.PodReadinessGate, conds []corev1.PodCondition) string {
	var msgs []string
	for _, g := range gates {
		i := slices.IndexFunc(conds, func(c corev1.PodCondition) bool { return c.Type == g.ConditionType })
		switch {
		case i < 0:
			msgs = append(msgs, fmt.Sprintf("corresponding condition of pod readiness gate %q does not exist.", g.ConditionType))
		case conds[i].Status != corev1.ConditionTrue:
			msgs = append(msgs, fmt.Sprintf("the status of pod readiness gate %q is not \"True\", but %v", g.ConditionType, conds[i].Status))
		}
	}
	return strings.Join(msgs, ", ")
}

// mergeConditions replaces the conditions nodelet owns in old, in place, and
// appends those old lacks; lastTransitionTime is kept when the status is.
func mergeConditions(old, ours []corev1.PodCondition, now metav1.Time) []corev1.PodCondition {
	out := make([]corev1.PodCondition, 0, len(old)+len(ours))
	out = append(out, old...)
	for _, c := range ours {
		i := slices.IndexFunc(out, func(o corev1.PodCondition) bool { return o.Type == c.Type })
		if i < 0 {
			c.LastTransitionTime = now
			out = append(out, c)
			continue
		}
		c.LastTransitionTime = out[i].LastTransitionTime
		c.LastProbeTime = out[i].LastProbeTime
		c.ObservedGeneration = out[i].ObservedGeneration
		if out[i].Status != c.Status || c.LastTransitionTime.IsZero() {
			c.LastTransitionTime = now
		}
		out[i] = c
	}
	return out
}

func isTerminal(p corev1.PodPhase) bool {
	return p == corev1.PodSucceeded || p == corev1.PodFailed
}

// isSidecar reports whether an init container is a restartable ("native
// sidecar") one: it keeps running next to the regular containers.
func isSidecar(c *corev1.Container) bool {
	return c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways
}

// initDone reports whether the init containers are done: every ordinary one
// terminated with exit code 0 and every sidecar started. It also names the
// ones that are not.
func initDone(specs []corev1.Container, statuses []corev1.ContainerStatus) (bool, []string) {
	var pending []string
	for i := range specs {
		var cs *corev1.ContainerStatus
		if i < len(statuses) {
			cs = &statuses[i]
		}
		switch {
		case cs == nil:
			pending = append(pending, specs[i].Name)
		case isSidecar(&specs[i]):
			if cs.Started == nil || !*cs.Started {
				pending = append(pending, specs[i].Name)
			}
		case cs.State.Terminated == nil || cs.State.Terminated.ExitCode != 0:
			pending = append(pending, specs[i].Name)
		}
	}
	return len(pending) == 0, pending
}

// podPhase follows the kubelet's getPhase: init containers that are not done
// keep the pod Pending (or fail it for good under restartPolicy Never); then a
// container that never ran keeps it Pending, a running one makes it Running,
// and when all have stopped the restart policy and exit codes decide.
func podPhase(policy corev1.RestartPolicy, initSpecs []corev1.Container, initSt, regular []corev1.ContainerStatus) corev1.PodPhase {
	if done, _ := initDone(initSpecs, initSt); !done {
		if policy == corev1.RestartPolicyNever {
			for i, cs := range initSt {
				if i < len(initSpecs) && !isSidecar(&initSpecs[i]) &&
					cs.State.Terminated != nil && cs.State.Terminated.ExitCode != 0 {
					return corev1.PodFailed
				}
			}
		}
		return corev1.PodPending
	}
	if len(regular) == 0 {
		return corev1.PodPending
	}
	var waiting, running, stopped, succeeded int
	for _, cs := range regular {
		switch {
		case cs.State.Running != nil:
			running++
		case cs.State.Terminated != nil:
			stopped++
			if cs.State.Terminated.ExitCode == 0 {
				succeeded++
			}
		case cs.LastTerminationState.Terminated != nil:
			// Waiting to be restarted (CrashLoopBackOff): it ran, so it
			// counts as stopped, like the kubelet counts it.
			stopped++
		default:
			waiting++
		}
	}
	switch {
	case waiting > 0:
		return corev1.PodPending
	case running > 0:
		return corev1.PodRunning
	case policy == corev1.RestartPolicyAlways:
		return corev1.PodRunning
	case stopped == succeeded:
		return corev1.PodSucceeded
	case policy == corev1.RestartPolicyNever:
		return corev1.PodFailed
	default:
		return corev1.PodRunning
	}
}

// deletedPhase is the phase a pod being deleted ends in once its
// containers are stopped: Succeeded when every container that ran
// succeeded, Failed otherwise (as the kubelet does since 1.27).
func deletedPhase(regular []corev1.ContainerStatus) corev1.PodPhase {
	for _, cs := range regular {
		if cs.State.Terminated == nil || cs.State.Terminated.ExitCode != 0 {
			return corev1.PodFailed
		}
	}
	return corev1.PodSucceeded
}

// sortIPs puts IPv4 addresses first, as the kubelet reports a dual-stack
// pod's primary family first and our clusters are IPv4-primary.
func sortIPs(ips []string) []string {
	out := slices.Clone(ips)
	slices.SortStableFunc(out, func(a, b string) int {
		av4 := net.ParseIP(a).To4() != nil
		bv4 := net.ParseIP(b).To4() != nil
		switch {
		case av4 && !bv4:
			return -1
		case bv4 && !av4:
			return 1
		}
		return 0
	})
	return out
}

// shouldRestart reports whether a container that exited with code is started
// again under the pod's restart policy. Init containers only ever restart on
// failure (and never under Never); sidecars always restart.
func shouldRestart(policy corev1.RestartPolicy, c *corev1.Container, isInit bool, code int32) bool {
	if isInit {
		if isSidecar(c) {
			return true
		}
		return code != 0 && policy != corev1.RestartPolicyNever
	}
	if c.RestartPolicy != nil {
		// Per-container restart policy (alpha in Kubernetes); honour it.
		policy = corev1.RestartPolicy(*c.RestartPolicy)
	}
	switch policy {
	case corev1.RestartPolicyAlways:
		return true
	case corev1.RestartPolicyOnFailure:
		return code != 0
	default:
		return false
	}
}
