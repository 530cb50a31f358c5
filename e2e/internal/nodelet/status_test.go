package nodelet

import (
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func running() corev1.ContainerStatus {
	return corev1.ContainerStatus{State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}}
}

func exited(code int32) corev1.ContainerStatus {
	return corev1.ContainerStatus{State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: code}}}
}

func waitingFor(reason string) corev1.ContainerStatus {
	return corev1.ContainerStatus{State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason}}}
}

func crashLooping() corev1.ContainerStatus {
	cs := waitingFor(reasonCrashLoopBackOff)
	cs.LastTerminationState.Terminated = &corev1.ContainerStateTerminated{ExitCode: 1}
	return cs
}

func started(cs corev1.ContainerStatus) corev1.ContainerStatus {
	t := true
	cs.Started = &t
	return cs
}

func TestPodPhase(t *testing.T) {
	always := corev1.RestartPolicyAlways
	sidecarPolicy := corev1.ContainerRestartPolicyAlways
	initSpec := []corev1.Container{{Name: "init"}}
	sidecarSpec := []corev1.Container{{Name: "side", RestartPolicy: &sidecarPolicy}}
	tests := []struct {
		name     string
		policy   corev1.RestartPolicy
		initSpec []corev1.Container
		init     []corev1.ContainerStatus
		regular  []corev1.ContainerStatus
		want     corev1.PodPhase
	}{
		{"a pod whose containers are being created is pending", always, nil, nil,
			[]corev1.ContainerStatus{waitingFor(reasonContainerCreating)}, corev1.PodPending},
		{"a pod with an image that is not in the table is pending", always, nil, nil,
			[]corev1.ContainerStatus{running(), waitingFor(reasonErrImagePull)}, corev1.PodPending},
		{"a pod with a running container is running", always, nil, nil,
			[]corev1.ContainerStatus{running()}, corev1.PodRunning},
		{"a crash-looping container keeps an Always pod running", always, nil, nil,
			[]corev1.ContainerStatus{crashLooping()}, corev1.PodRunning},
		{"a crash-looping container keeps an OnFailure pod running", corev1.RestartPolicyOnFailure, nil, nil,
			[]corev1.ContainerStatus{crashLooping()}, corev1.PodRunning},
		{"an OnFailure pod whose containers all succeeded has succeeded", corev1.RestartPolicyOnFailure, nil, nil,
			[]corev1.ContainerStatus{exited(0), exited(0)}, corev1.PodSucceeded},
		{"a Never pod with a failed container has failed", corev1.RestartPolicyNever, nil, nil,
			[]corev1.ContainerStatus{exited(0), exited(3)}, corev1.PodFailed},
		{"a Never pod with one container still running is running", corev1.RestartPolicyNever, nil, nil,
			[]corev1.ContainerStatus{exited(3), running()}, corev1.PodRunning},
		{"an Always pod whose containers all exited is still running", always, nil, nil,
			[]corev1.ContainerStatus{exited(0)}, corev1.PodRunning},
		{"a pod whose init container runs is pending", always, initSpec,
			[]corev1.ContainerStatus{running()}, []corev1.ContainerStatus{waitingFor(reasonPodInitializing)}, corev1.PodPending},
		{"a Never pod whose init container failed has failed", corev1.RestartPolicyNever, initSpec,
			[]corev1.ContainerStatus{exited(1)}, []corev1.ContainerStatus{waitingFor(reasonPodInitializing)}, corev1.PodFailed},
		{"an Always pod whose init container failed retries and stays pending", always, initSpec,
			[]corev1.ContainerStatus{exited(1)}, []corev1.ContainerStatus{waitingFor(reasonPodInitializing)}, corev1.PodPending},
		{"a pod whose init container succeeded runs its containers", always, initSpec,
			[]corev1.ContainerStatus{exited(0)}, []corev1.ContainerStatus{running()}, corev1.PodRunning},
		{"a sidecar that has not started holds the pod pending", always, sidecarSpec,
			[]corev1.ContainerStatus{running()}, []corev1.ContainerStatus{waitingFor(reasonPodInitializing)}, corev1.PodPending},
		{"a running sidecar does not keep a finished Never pod from succeeding", corev1.RestartPolicyNever, sidecarSpec,
			[]corev1.ContainerStatus{started(running())}, []corev1.ContainerStatus{exited(0)}, corev1.PodSucceeded},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := podPhase(tt.policy, tt.initSpec, tt.init, tt.regular); got != tt.want {
				t.Errorf("podPhase = %s, want %s", got, tt.want)
			}
		})
	}
}

func condition(st corev1.PodStatus, t corev1.PodConditionType) corev1.PodCondition {
	i := slices.IndexFunc(st.Conditions, func(c corev1.PodCondition) bool { return c.Type == t })
	if i < 0 {
		return corev1.PodCondition{}
	}
	return st.Conditions[i]
}

func TestComputeStatusConditions(t *testing.T) {
	now := metav1.NewTime(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	earlier := metav1.NewTime(now.Add(-time.Hour))
	readyCS := func() corev1.ContainerStatus { cs := started(running()); cs.Name = "app"; cs.Ready = true; return cs }
	unreadyCS := func() corev1.ContainerStatus { cs := started(running()); cs.Name = "app"; return cs }
	base := func() *corev1.Pod {
		return &corev1.Pod{Spec: corev1.PodSpec{RestartPolicy: corev1.RestartPolicyAlways,
			Containers: []corev1.Container{{Name: "app"}}}}
	}
	tests := []struct {
		name      string
		pod       func() *corev1.Pod
		in        statusInput
		condition corev1.PodConditionType
		want      corev1.ConditionStatus
		reason    string
	}{
		{"a pod without a sandbox is not ready to start containers", base,
			statusInput{Regular: []corev1.ContainerStatus{waitingFor(reasonContainerCreating)}},
			corev1.PodReadyToStartContainers, corev1.ConditionFalse, ""},
		{"a pod with a sandbox is ready to start containers", base,
			statusInput{SandboxReady: true, Regular: []corev1.ContainerStatus{waitingFor(reasonContainerCreating)}},
			corev1.PodReadyToStartContainers, corev1.ConditionTrue, ""},
		{"a pod with a ready container is ready", base,
			statusInput{SandboxReady: true, Regular: []corev1.ContainerStatus{readyCS()}},
			corev1.PodReady, corev1.ConditionTrue, ""},
		{"a pod with an unready container is not ready", base,
			statusInput{SandboxReady: true, Regular: []corev1.ContainerStatus{unreadyCS()}},
			corev1.ContainersReady, corev1.ConditionFalse, "ContainersNotReady"},
		{"a readiness gate without its condition holds the pod back", func() *corev1.Pod {
			p := base()
			p.Spec.ReadinessGates = []corev1.PodReadinessGate{{ConditionType: "example.com/gate"}}
			return p
		}, statusInput{SandboxReady: true, Regular: []corev1.ContainerStatus{readyCS()}},
			corev1.PodReady, corev1.ConditionFalse, "ReadinessGatesNotReady"},
		{"a readiness gate that is true lets the pod be ready", func() *corev1.Pod {
			p := base()
			p.Spec.ReadinessGates = []corev1.PodReadinessGate{{ConditionType: "example.com/gate"}}
			p.Status.Conditions = []corev1.PodCondition{{Type: "example.com/gate", Status: corev1.ConditionTrue}}
			return p
		}, statusInput{SandboxReady: true, Regular: []corev1.ContainerStatus{readyCS()}},
			corev1.PodReady, corev1.ConditionTrue, ""},
		{"a pod whose init container runs is not initialized", func() *corev1.Pod {
			p := base()
			p.Spec.InitContainers = []corev1.Container{{Name: "init"}}
			return p
		}, statusInput{SandboxReady: true, Init: []corev1.ContainerStatus{running()},
			Regular: []corev1.ContainerStatus{waitingFor(reasonPodInitializing)}},
			corev1.PodInitialized, corev1.ConditionFalse, "ContainersNotInitialized"},
		{"a pod that succeeded is not ready because it completed", func() *corev1.Pod {
			p := base()
			p.Spec.RestartPolicy = corev1.RestartPolicyNever
			return p
		}, statusInput{Regular: []corev1.ContainerStatus{exited(0)}},
			corev1.PodReady, corev1.ConditionFalse, "PodCompleted"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.in.Now = now
			got := condition(computeStatus(tt.pod(), tt.in), tt.condition)
			if got.Status != tt.want || got.Reason != tt.reason {
				t.Errorf("%s = %s (%q), want %s (%q)", tt.condition, got.Status, got.Reason, tt.want, tt.reason)
			}
		})
	}

	t.Run("an unchanged condition keeps its transition time", func(t *testing.T) {
		pod := base()
		pod.Status.Conditions = []corev1.PodCondition{
			{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: earlier},
			{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: earlier},
		}
		st := computeStatus(pod, statusInput{SandboxReady: true, Regular: []corev1.ContainerStatus{readyCS()}, Now: now})
		if c := condition(st, corev1.PodReady); !c.LastTransitionTime.Equal(&earlier) {
			t.Errorf("Ready transition time = %v, want %v", c.LastTransitionTime, earlier)
		}
		if c := condition(st, corev1.ContainersReady); !c.LastTransitionTime.Equal(&now) {
			t.Errorf("new ContainersReady transition time = %v, want %v", c.LastTransitionTime, now)
		}
		if c := condition(st, corev1.PodScheduled); c.Status != corev1.ConditionTrue {
			t.Error("the scheduler's PodScheduled condition was dropped")
		}
	})
	t.Run("a terminal phase is never left", func(t *testing.T) {
		pod := base()
		pod.Status.Phase = corev1.PodSucceeded
		st := computeStatus(pod, statusInput{Regular: []corev1.ContainerStatus{waitingFor(reasonContainerCreating)}, Now: now})
		if st.Phase != corev1.PodSucceeded {
			t.Errorf("phase = %s, want Succeeded", st.Phase)
		}
	})
	t.Run("pod and host IPs are reported primary first", func(t *testing.T) {
		st := computeStatus(base(), statusInput{PodIPs: []string{"10.244.1.5", "fd00::5"}, HostIP: "10.0.0.2",
			Regular: []corev1.ContainerStatus{readyCS()}, Now: now})
		if st.PodIP != "10.244.1.5" || len(st.PodIPs) != 2 || st.HostIP != "10.0.0.2" || st.HostIPs[0].IP != "10.0.0.2" {
			t.Errorf("ips: podIP %s podIPs %v hostIP %s hostIPs %v", st.PodIP, st.PodIPs, st.HostIP, st.HostIPs)
		}
	})
}

func TestShouldRestart(t *testing.T) {
	sidecar := corev1.ContainerRestartPolicyAlways
	plain := &corev1.Container{}
	side := &corev1.Container{RestartPolicy: &sidecar}
	tests := []struct {
		name   string
		policy corev1.RestartPolicy
		c      *corev1.Container
		init   bool
		code   int32
		want   bool
	}{
		{"Always restarts a container that succeeded", corev1.RestartPolicyAlways, plain, false, 0, true},
		{"OnFailure restarts a container that failed", corev1.RestartPolicyOnFailure, plain, false, 1, true},
		{"OnFailure leaves a container that succeeded", corev1.RestartPolicyOnFailure, plain, false, 0, false},
		{"Never leaves a container that failed", corev1.RestartPolicyNever, plain, false, 1, false},
		{"an init container that failed is retried under Always", corev1.RestartPolicyAlways, plain, true, 1, true},
		{"an init container that succeeded is not run again", corev1.RestartPolicyAlways, plain, true, 0, false},
		{"an init container that failed is not retried under Never", corev1.RestartPolicyNever, plain, true, 1, false},
		{"a sidecar restarts even under Never", corev1.RestartPolicyNever, side, true, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := shouldRestart(tt.policy, tt.c, tt.init, tt.code); got != tt.want {
				t.Errorf("shouldRestart = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestNextCrashBackoff(t *testing.T) {
	const base, max, reset = 10 * time.Second, 5 * time.Minute, 10 * time.Minute
	tests := []struct {
		name             string
		cur, ran         time.Duration
		delay, nextDelay time.Duration
	}{
		{"the first restart is immediate", 0, time.Second, 0, base},
		{"the second restart waits the base back-off", base, time.Second, base, 2 * base},
		{"the back-off doubles", 4 * base, time.Second, 4 * base, 8 * base},
		{"the back-off is capped at five minutes", 4 * time.Minute, time.Second, 4 * time.Minute, max},
		{"a container that ran ten minutes starts over", max, reset, 0, base},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, next := nextCrashBackoff(tt.cur, tt.ran, base, max, reset)
			if d != tt.delay || next != tt.nextDelay {
				t.Errorf("nextCrashBackoff = %s, %s; want %s, %s", d, next, tt.delay, tt.nextDelay)
			}
		})
	}
}

func TestCapabilities(t *testing.T) {
	yes := true
	tests := []struct {
		name string
		sc   *corev1.SecurityContext
		want []string // nil: all
		has  []string
		not  []string
	}{
		{"a privileged container keeps every capability", &corev1.SecurityContext{Privileged: &yes}, nil, nil, nil},
		{"a plain container gets the runtime default", nil, []string{}, []string{"CHOWN", "NET_BIND_SERVICE"}, []string{"NET_ADMIN", "SYS_ADMIN"}},
		{"added capabilities are kept, with or without the CAP_ prefix", &corev1.SecurityContext{Capabilities: &corev1.Capabilities{
			Add: []corev1.Capability{"NET_ADMIN", "CAP_SYS_ADMIN"}}}, []string{}, []string{"NET_ADMIN", "SYS_ADMIN", "CHOWN"}, nil},
		{"dropping ALL then adding keeps only what was added", &corev1.SecurityContext{Capabilities: &corev1.Capabilities{
			Drop: []corev1.Capability{"ALL"}, Add: []corev1.Capability{"NET_ADMIN"}}}, []string{}, []string{"NET_ADMIN"}, []string{"CHOWN"}},
		{"a dropped default capability is gone", &corev1.SecurityContext{Capabilities: &corev1.Capabilities{
			Drop: []corev1.Capability{"net_raw"}}}, []string{}, []string{"CHOWN"}, []string{"NET_RAW"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := capabilities(tt.sc)
			if (got == nil) != (tt.want == nil) {
				t.Fatalf("capabilities = %v, want all: %v", got, tt.want == nil)
			}
			for _, c := range tt.has {
				if !slices.Contains(got, c) {
					t.Errorf("%s missing from %v", c, got)
				}
			}
			for _, c := range tt.not {
				if slices.Contains(got, c) {
					t.Errorf("%s kept in %v", c, got)
				}
			}
		})
	}
}

func TestContainerStatus(t *testing.T) {
	spec := &corev1.Container{Name: "app", Image: "ambient-mesh/echo-server"}
	t.Run("a container not tried yet waits with the given reason", func(t *testing.T) {
		cs := containerStatus(spec, nil, reasonPodInitializing, false)
		if cs.State.Waiting == nil || cs.State.Waiting.Reason != reasonPodInitializing || cs.Ready {
			t.Errorf("status = %+v", cs)
		}
	})
	t.Run("a running container without probes is started and ready", func(t *testing.T) {
		c := &container{state: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}, started: true, ready: true, proc: &process{}}
		cs := containerStatus(spec, c, reasonContainerCreating, false)
		if !cs.Ready || cs.Started == nil || !*cs.Started {
			t.Errorf("status = %+v", cs)
		}
	})
	t.Run("a completed init container is ready", func(t *testing.T) {
		c := &container{state: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{Reason: reasonCompleted}}, completed: true}
		if cs := containerStatus(spec, c, reasonPodInitializing, true); !cs.Ready {
			t.Errorf("status = %+v", cs)
		}
	})
	t.Run("a crash-looping container shows its last termination", func(t *testing.T) {
		c := &container{
			state:        corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reasonCrashLoopBackOff}},
			lastState:    corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 2}},
			restartCount: 3,
		}
		cs := containerStatus(spec, c, reasonContainerCreating, false)
		if cs.State.Waiting.Reason != reasonCrashLoopBackOff || cs.LastTerminationState.Terminated.ExitCode != 2 || cs.RestartCount != 3 || cs.Ready {
			t.Errorf("status = %+v", cs)
		}
	})
}
