// Package podenv resolves a container's environment the way the kubelet does:
// envFrom and env (literal values with $(VAR) expansion, the downward API,
// resource fields, ConfigMap and Secret keys) plus the service link variables,
// of which the kubernetes service's are always present.
package podenv

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Params carries what the pod object alone does not say.
type Params struct {
	// PodIPs and HostIPs are the pod's and the node's addresses, primary first.
	PodIPs, HostIPs []string
	// KubernetesServiceHost and KubernetesServicePort locate the API server's
	// service (the kubelet's "master service") for KUBERNETES_SERVICE_* vars.
	KubernetesServiceHost, KubernetesServicePort string
}

// ErrNotFound is wrapped by Resolve's errors for a ConfigMap, Secret or key
// that does not exist and is not optional; the caller reports the container
// as waiting with CreateContainerConfigError.
var ErrNotFound = errors.New("not found")

// Resolve returns the container's environment as "K=V" strings, each key once.
// As in the kubelet, envFrom is applied first, env overrides it in declaration
// order, and service link variables fill in whatever names are left. Values
// from envFrom and service links come in sorted key order.
func Resolve(ctx context.Context, c kubernetes.Interface, pod *corev1.Pod, ctr *corev1.Container, p Params) ([]string, error) {
	r := &resolver{
		ctx:        ctx,
		client:     c,
		pod:        pod,
		configMaps: map[string]*corev1.ConfigMap{},
		secrets:    map[string]*corev1.Secret{},
	}
	env := newOrdered()
	for i := range ctr.EnvFrom {
		if err := r.envFrom(env, &ctr.EnvFrom[i]); err != nil {
			return nil, err
		}
	}

	svcEnv := serviceEnv(ctx, c, pod, p)
	mapping := func(name string) (string, bool) {
		if v, ok := env.get(name); ok {
			return v, true
		}
		v, ok := svcEnv[name]
		return v, ok
	}
	for i := range ctr.Env {
		ev := &ctr.Env[i]
		val := ev.Value
		switch {
		case val != "":
			val = expand(val, mapping)
		case ev.ValueFrom != nil:
			v, skip, err := r.valueFrom(ctr, ev, p)
			if err != nil {
				return nil, fmt.Errorf("env %s: %w", ev.Name, err)
			}
			if skip {
				continue
			}
			val = v
		}
		env.set(ev.Name, val)
	}

	svcKeys := make([]string, 0, len(svcEnv))
	for k := range svcEnv {
		svcKeys = append(svcKeys, k)
	}
	sort.Strings(svcKeys)
	for _, k := range svcKeys {
		if _, ok := env.get(k); !ok {
			env.set(k, svcEnv[k])
		}
	}
	return env.list(), nil
}

// resolver fetches each ConfigMap and Secret at most once per Resolve call,
// so every reference sees the same version.
type resolver struct {
	ctx        context.Context
	client     kubernetes.Interface
	pod        *corev1.Pod
	configMaps map[string]*corev1.ConfigMap // nil value: optional and absent
	secrets    map[string]*corev1.Secret
}

func (r *resolver) configMap(name string, optional bool) (*corev1.ConfigMap, error) {
	if cm, ok := r.configMaps[name]; ok && cm != nil {
		return cm, nil
	}
	cm, err := r.client.CoreV1().ConfigMaps(r.pod.Namespace).Get(r.ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		if optional {
			return nil, nil
		}
		return nil, fmt.Errorf("configmap %q %w", name, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("getting configmap %q: %w", name, err)
	}
	r.configMaps[name] = cm
	return cm, nil
}

func (r *resolver) secret(name string, optional bool) (*corev1.Secret, error) {
	if s, ok := r.secrets[name]; ok && s != nil {
		return s, nil
	}
	s, err := r.client.CoreV1().Secrets(r.pod.Namespace).Get(r.ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		if optional {
			return nil, nil
		}
		return nil, fmt.Errorf("secret %q %w", name, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("getting secret %q: %w", name, err)
	}
	r.secrets[name] = s
	return s, nil
}

func (r *resolver) envFrom(env *ordered, src *corev1.EnvFromSource) error {
	data := map[string]string{}
	switch {
	case src.ConfigMapRef != nil:
		cm, err := r.configMap(src.ConfigMapRef.Name, isTrue(src.ConfigMapRef.Optional))
		if err != nil {
			return fmt.Errorf("envFrom: %w", err)
		}
		if cm == nil {
			return nil
		}
		for k, v := range cm.Data {
			data[k] = v
		}
	case src.SecretRef != nil:
		s, err := r.secret(src.SecretRef.Name, isTrue(src.SecretRef.Optional))
		if err != nil {
			return fmt.Errorf("envFrom: %w", err)
		}
		if s == nil {
			return nil
		}
		for k, v := range s.Data {
			data[k] = string(v)
		}
	default:
		return nil
	}
	keys := make([]string, 0, len(data))
	for k := range data {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		name := src.Prefix + k
		if !ValidEnvName(name) {
			continue
		}
		env.set(name, data[k])
	}
	return nil
}

// valueFrom resolves env[].valueFrom; skip reports an optional source that
// is absent, in which case the variable is left out.
func (r *resolver) valueFrom(ctr *corev1.Container, ev *corev1.EnvVar, p Params) (val string, skip bool, err error) {
	vf := ev.ValueFrom
	switch {
	case vf.FieldRef != nil:
		v, err := FieldRef(r.pod, vf.FieldRef, p)
		return v, false, err
	case vf.ResourceFieldRef != nil:
		v, err := ResourceField(r.pod, ctr, vf.ResourceFieldRef)
		return v, false, err
	case vf.ConfigMapKeyRef != nil:
		ref := vf.ConfigMapKeyRef
		optional := isTrue(ref.Optional)
		cm, err := r.configMap(ref.Name, optional)
		if err != nil {
			return "", false, err
		}
		if cm == nil {
			return "", true, nil
		}
		if v, ok := cm.Data[ref.Key]; ok {
			return v, false, nil
		}
		if v, ok := cm.BinaryData[ref.Key]; ok {
			return string(v), false, nil
		}
		if optional {
			return "", true, nil
		}
		return "", false, fmt.Errorf("key %q in configmap %q %w", ref.Key, ref.Name, ErrNotFound)
	case vf.SecretKeyRef != nil:
		ref := vf.SecretKeyRef
		optional := isTrue(ref.Optional)
		s, err := r.secret(ref.Name, optional)
		if err != nil {
			return "", false, err
		}
		if s == nil {
			return "", true, nil
		}
		if v, ok := s.Data[ref.Key]; ok {
			return string(v), false, nil
		}
		if optional {
			return "", true, nil
		}
		return "", false, fmt.Errorf("key %q in secret %q %w", ref.Key, ref.Name, ErrNotFound)
	}
	return "", false, errors.New("unsupported valueFrom source")
}

// ValidEnvName reports whether name may be a variable name. Kubernetes accepts
// any printable ASCII except '=' since RelaxedEnvironmentVariableValidation;
// envFrom keys that fail this are skipped, as the kubelet does.
func ValidEnvName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c < ' ' || c > '~' || c == '=' {
			return false
		}
	}
	return true
}

// serviceEnv returns the service link variables: the kubernetes service's
// always, and those of the pod's namespace's services unless
// enableServiceLinks is false. Listing services is best effort: those links
// are a convenience, and a failed list must not keep a container from starting.
func serviceEnv(ctx context.Context, c kubernetes.Interface, pod *corev1.Pod, p Params) map[string]string {
	m := map[string]string{}
	if p.KubernetesServiceHost != "" && p.KubernetesServicePort != "" {
		port, err := strconv.Atoi(p.KubernetesServicePort)
		if err == nil {
			addServiceLinks(m, "kubernetes", p.KubernetesServiceHost, []corev1.ServicePort{{Name: "https", Port: int32(port), Protocol: corev1.ProtocolTCP}})
		}
	}
	if pod.Spec.EnableServiceLinks != nil && !*pod.Spec.EnableServiceLinks {
		return m
	}
	if c == nil {
		return m
	}
	list, err := c.CoreV1().Services(pod.Namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return m
	}
	svcs := list.Items
	sort.Slice(svcs, func(i, j int) bool { return svcs[i].Name < svcs[j].Name })
	for i := range svcs {
		s := &svcs[i]
		if s.Spec.ClusterIP == "" || s.Spec.ClusterIP == corev1.ClusterIPNone || len(s.Spec.Ports) == 0 {
			continue
		}
		if pod.Namespace == metav1.NamespaceDefault && s.Name == "kubernetes" {
			continue // already added from Params
		}
		addServiceLinks(m, s.Name, s.Spec.ClusterIP, s.Spec.Ports)
	}
	return m
}

// addServiceLinks adds the variables of pkg/kubelet/envvars.FromServices for
// one service: NAME_SERVICE_HOST/PORT[_PORTNAME] and the Docker-style
// NAME_PORT[_<port>_<PROTO>[_PROTO|_PORT|_ADDR]] links.
func addServiceLinks(m map[string]string, svcName, ip string, ports []corev1.ServicePort) {
	prefix := envName(svcName)
	m[prefix+"_SERVICE_HOST"] = ip
	m[prefix+"_SERVICE_PORT"] = strconv.Itoa(int(ports[0].Port))
	for _, sp := range ports {
		if sp.Name != "" {
			m[prefix+"_SERVICE_PORT_"+envName(sp.Name)] = strconv.Itoa(int(sp.Port))
		}
	}
	for i, sp := range ports {
		proto := string(corev1.ProtocolTCP)
		if sp.Protocol != "" {
			proto = string(sp.Protocol)
		}
		url := strings.ToLower(proto) + "://" + net.JoinHostPort(ip, strconv.Itoa(int(sp.Port)))
		if i == 0 {
			m[prefix+"_PORT"] = url
		}
		pp := fmt.Sprintf("%s_PORT_%d_%s", prefix, sp.Port, strings.ToUpper(proto))
		m[pp] = url
		m[pp+"_PROTO"] = strings.ToLower(proto)
		m[pp+"_PORT"] = strconv.Itoa(int(sp.Port))
		m[pp+"_ADDR"] = ip
	}
}

func envName(s string) string {
	return strings.ToUpper(strings.ReplaceAll(s, "-", "_"))
}

func isTrue(b *bool) bool { return b != nil && *b }

// ordered is a map that remembers where each key was first set.
type ordered struct {
	keys []string
	vals map[string]string
}

func newOrdered() *ordered { return &ordered{vals: map[string]string{}} }

func (o *ordered) set(k, v string) {
	if _, ok := o.vals[k]; !ok {
		o.keys = append(o.keys, k)
	}
	o.vals[k] = v
}

func (o *ordered) get(k string) (string, bool) {
	v, ok := o.vals[k]
	return v, ok
}

func (o *ordered) list() []string {
	out := make([]string, 0, len(o.keys))
	for _, k := range o.keys {
		out = append(out, k+"="+o.vals[k])
	}
	return out
}
