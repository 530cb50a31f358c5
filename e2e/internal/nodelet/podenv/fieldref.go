package podenv

import (
	"bufio"
	"errors"
	"fmt"
	"math"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
)

// FieldRef returns the value of a downward API field of pod. Volumes pass a
// zero Params: only metadata fields are allowed there.
func FieldRef(pod *corev1.Pod, fs *corev1.ObjectFieldSelector, p Params) (string, error) {
	if fs.APIVersion != "" && fs.APIVersion != "v1" {
		return "", fmt.Errorf("unsupported fieldRef apiVersion %q", fs.APIVersion)
	}
	path := fs.FieldPath
	if sub, ok := subscript(path, "metadata.labels"); ok {
		return pod.Labels[sub], nil
	}
	if sub, ok := subscript(path, "metadata.annotations"); ok {
		return pod.Annotations[sub], nil
	}
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "metadata.labels":
		return formatMap(pod.Labels), nil
	case "metadata.annotations":
		return formatMap(pod.Annotations), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.podIP":
		if len(p.PodIPs) > 0 {
			return p.PodIPs[0], nil
		}
		return pod.Status.PodIP, nil
	case "status.podIPs":
		if len(p.PodIPs) > 0 {
			return strings.Join(p.PodIPs, ","), nil
		}
		ips := make([]string, 0, len(pod.Status.PodIPs))
		for _, ip := range pod.Status.PodIPs {
			ips = append(ips, ip.IP)
		}
		return strings.Join(ips, ","), nil
	case "status.hostIP":
		if len(p.HostIPs) > 0 {
			return p.HostIPs[0], nil
		}
		return pod.Status.HostIP, nil
	case "status.hostIPs":
		if len(p.HostIPs) > 0 {
			return strings.Join(p.HostIPs, ","), nil
		}
		ips := make([]string, 0, len(pod.Status.HostIPs))
		for _, ip := range pod.Status.HostIPs {
			ips = append(ips, ip.IP)
		}
		return strings.Join(ips, ","), nil
	}
	return "", fmt.Errorf("unsupported fieldRef path %q", path)
}

// subscript parses "<prefix>['key']" and returns key.
func subscript(path, prefix string) (string, bool) {
	rest, ok := strings.CutPrefix(path, prefix+"['")
	if !ok || !strings.HasSuffix(rest, "']") {
		return "", false
	}
	return strings.TrimSuffix(rest, "']"), true
}

// formatMap renders labels or annotations as the downward API does: one
// key="quoted value" a line, sorted by key.
func formatMap(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%q\n", k, m[k])
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// ResourceField returns a resourceFieldRef's value for ctr (or for the pod's
// container fs.ContainerName names), divided by the divisor and rounded up.
// As in the kubelet, an unset limit reads as the node's allocatable amount,
// here the machine's CPU count and memory.
func ResourceField(pod *corev1.Pod, ctr *corev1.Container, fs *corev1.ResourceFieldSelector) (string, error) {
	if fs.ContainerName != "" && (ctr == nil || ctr.Name != fs.ContainerName) {
		ctr = findContainer(pod, fs.ContainerName)
		if ctr == nil {
			return "", fmt.Errorf("resourceFieldRef: no container %q", fs.ContainerName)
		}
	}
	if ctr == nil {
		return "", errors.New("resourceFieldRef: no container")
	}
	divisor := fs.Divisor
	if divisor.IsZero() {
		divisor = resource.MustParse("1")
	}
	kind, name, ok := strings.Cut(fs.Resource, ".")
	if !ok || (kind != "limits" && kind != "requests") {
		return "", fmt.Errorf("unsupported resourceFieldRef %q", fs.Resource)
	}
	list := ctr.Resources.Requests
	if kind == "limits" {
		list = ctr.Resources.Limits
	}
	q, set := list[corev1.ResourceName(name)]
	switch corev1.ResourceName(name) {
	case corev1.ResourceCPU:
		if !set && kind == "limits" {
			q = *resource.NewQuantity(int64(runtime.NumCPU()), resource.DecimalSI)
		}
		return strconv.FormatInt(int64(math.Ceil(float64(q.MilliValue())/float64(divisor.MilliValue()))), 10), nil
	case corev1.ResourceMemory:
		if !set && kind == "limits" {
			q = *resource.NewQuantity(memTotal(), resource.BinarySI)
		}
	case corev1.ResourceEphemeralStorage:
	default:
		if !strings.HasPrefix(name, corev1.ResourceHugePagesPrefix) {
			return "", fmt.Errorf("unsupported resourceFieldRef %q", fs.Resource)
		}
	}
	return strconv.FormatInt(int64(math.Ceil(float64(q.Value())/float64(divisor.Value()))), 10), nil
}

func findContainer(pod *corev1.Pod, name string) *corev1.Container {
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == name {
			return &pod.Spec.Containers[i]
		}
	}
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == name {
			return &pod.Spec.InitContainers[i]
		}
	}
	return nil
}

// memTotal returns the machine's memory in bytes from /proc/meminfo, or 0.
func memTotal() int64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			return 0
		}
		kb, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return 0
		}
		return kb * 1024
	}
	return 0
}
