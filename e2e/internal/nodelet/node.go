package nodelet

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/util/retry"
)

// nodeLeaseNamespace holds one Lease per node, renewed as the node's
// heartbeat (the node lifecycle controller reads it).
const nodeLeaseNamespace = corev1.NamespaceNodeLease

// registerNode creates the Node, or takes over an existing one, and writes its
// status. It retries until it succeeds or ctx ends.
func (n *Nodelet) registerNode(ctx context.Context) (*corev1.Node, error) {
	var node *corev1.Node
	err := wait.PollUntilContextCancel(ctx, 2*time.Second, true, func(ctx context.Context) (bool, error) {
		var err error
		node, err = n.ensureNode(ctx)
		if err != nil {
			n.logf("registering node: %v", err)
			return false, nil
		}
		return true, nil
	})
	if err != nil {
		return nil, fmt.Errorf("registering node %s: %w", n.cfg.NodeName, err)
	}
	return node, nil
}

func (n *Nodelet) ensureNode(ctx context.Context) (*corev1.Node, error) {
	nodes := n.client.CoreV1().Nodes()
	node, err := nodes.Create(ctx, n.initialNode(), metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		node, err = nodes.Get(ctx, n.cfg.NodeName, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("getting node: %w", err)
		}
		if node.Spec.PodCIDR == "" && len(n.cfg.PodCIDRs) > 0 {
			node.Spec.PodCIDR = n.cfg.PodCIDRs[0]
			node.Spec.PodCIDRs = n.cfg.PodCIDRs
			if node, err = nodes.Update(ctx, node, metav1.UpdateOptions{}); err != nil {
				return nil, fmt.Errorf("setting pod cidr: %w", err)
			}
		}
	} else if err != nil {
		return nil, fmt.Errorf("creating node: %w", err)
	}
	if err := n.updateNodeStatus(ctx); err != nil {
		return nil, err
	}
	return node, nil
}

func (n *Nodelet) initialNode() *corev1.Node {
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: n.cfg.NodeName,
			Labels: map[string]string{
				corev1.LabelHostname:   n.cfg.NodeName,
				corev1.LabelOSStable:   runtime.GOOS,
				corev1.LabelArchStable: runtime.GOARCH,
			},
		},
	}
	if len(n.cfg.PodCIDRs) > 0 {
		node.Spec.PodCIDR = n.cfg.PodCIDRs[0]
		node.Spec.PodCIDRs = n.cfg.PodCIDRs
	}
	return node
}

// updateNodeStatus writes the node's addresses, capacity, info and
// conditions with a fresh heartbeat.
func (n *Nodelet) updateNodeStatus(ctx context.Context) error {
	nodes := n.client.CoreV1().Nodes()
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		node, err := nodes.Get(ctx, n.cfg.NodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		n.setNodeStatus(&node.Status, metav1.NewTime(time.Now().Truncate(time.Second)))
		_, err = nodes.UpdateStatus(ctx, node, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("updating node status: %w", err)
	}
	return nil
}

// setNodeStatus fills the parts of a Node's status a kubelet owns.
func (n *Nodelet) setNodeStatus(st *corev1.NodeStatus, now metav1.Time) {
	st.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: n.cfg.NodeIP},
		{Type: corev1.NodeHostName, Address: n.cfg.NodeName},
	}
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:              *resource.NewQuantity(int64(runtime.NumCPU()), resource.DecimalSI),
		corev1.ResourceMemory:           *resource.NewQuantity(memTotal(), resource.BinarySI),
		corev1.ResourcePods:             *resource.NewQuantity(int64(n.cfg.MaxPods), resource.DecimalSI),
		corev1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
	}
	st.Capacity = capacity
	st.Allocatable = capacity.DeepCopy()
	st.DaemonEndpoints.KubeletEndpoint.Port = n.cfg.Port
	st.NodeInfo = corev1.NodeSystemInfo{
		MachineID:               machineID(),
		SystemUUID:              n.cfg.NodeName,
		BootID:                  bootID(),
		KernelVersion:           kernelVersion(),
		OSImage:                 "nodelet (local cluster)",
		ContainerRuntimeVersion: "nodelet://" + KubeletVersion,
		KubeletVersion:          KubeletVersion,
		OperatingSystem:         runtime.GOOS,
		Architecture:            runtime.GOARCH,
	}
	type cond struct {
		t               corev1.NodeConditionType
		s               corev1.ConditionStatus
		reason, message string
	}
	want := []cond{
		{corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory", "kubelet has sufficient memory available"},
		{corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure", "kubelet has no disk pressure"},
		{corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID", "kubelet has sufficient PID available"},
		{corev1.NodeReady, corev1.ConditionTrue, "KubeletReady", "kubelet is posting ready status"},
	}
	for _, w := range want {
		i := -1
		for j := range st.Conditions {
			if st.Conditions[j].Type == w.t {
				i = j
			}
		}
		c := corev1.NodeCondition{Type: w.t, Status: w.s, Reason: w.reason, Message: w.message,
			LastHeartbeatTime: now, LastTransitionTime: now}
		if i < 0 {
			st.Conditions = append(st.Conditions, c)
			continue
		}
		if st.Conditions[i].Status == w.s {
			c.LastTransitionTime = st.Conditions[i].LastTransitionTime
		}
		st.Conditions[i] = c
	}
}

// heartbeat refreshes the node status now and then; the lease is the
// frequent heartbeat.
func (n *Nodelet) heartbeat(ctx context.Context) {
	t := time.NewTicker(nodeStatusInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := n.updateNodeStatus(ctx); err != nil && ctx.Err() == nil {
				n.logf("%v", err)
			}
		}
	}
}

// renewLease keeps the node's Lease in kube-node-lease fresh.
func (n *Nodelet) renewLease(ctx context.Context, node *corev1.Node) {
	for {
		interval := leaseRenewInterval
		if err := n.renewLeaseOnce(ctx, node); err != nil {
			if ctx.Err() != nil {
				return
			}
			n.logf("renewing node lease: %v", err)
			interval = time.Second
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}

func (n *Nodelet) renewLeaseOnce(ctx context.Context, node *corev1.Node) error {
	leases := n.client.CoordinationV1().Leases(nodeLeaseNamespace)
	now := metav1.NewMicroTime(time.Now())
	holder := n.cfg.NodeName
	seconds := int32(leaseDuration / time.Second)
	lease, err := leases.Get(ctx, n.cfg.NodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		lease = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{
				Name:      n.cfg.NodeName,
				Namespace: nodeLeaseNamespace,
				OwnerReferences: []metav1.OwnerReference{{
					APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID,
				}},
			},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &seconds, RenewTime: &now},
		}
		_, err = leases.Create(ctx, lease, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	lease.Spec.HolderIdentity = &holder
	lease.Spec.LeaseDurationSeconds = &seconds
	lease.Spec.RenewTime = &now
	if len(lease.OwnerReferences) == 0 && node.UID != "" {
		lease.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID}}
	}
	_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
	return err
}

func memTotal() int64 {
	raw, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	var kb int64
	for _, line := range strings.Split(string(raw), "\n") {
		if _, err := fmt.Sscanf(line, "MemTotal: %d kB", &kb); err == nil {
			return kb * 1024
		}
	}
	return 0
}

func machineID() string {
	raw, _ := os.ReadFile("/etc/machine-id")
	return strings.TrimSpace(string(raw))
}

func bootID() string {
	raw, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(raw))
}

func kernelVersion() string {
	raw, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(raw))
}
