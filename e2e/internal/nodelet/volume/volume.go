// Package volume sets up a pod's volumes on the node's filesystem the way the
// kubelet's volume plugins do, and turns a container's volumeMounts into the
// bind mounts nsexec applies in the container's private mount namespace.
//
// ConfigMap, Secret, downwardAPI and projected volumes (service account tokens
// included) are written under <PodsDir>/<uid>/volumes/<name> with the
// kubelet's atomic writer layout, so Refresh can rotate tokens and resync
// contents while containers read them. emptyDir is a plain directory and
// hostPath is mapped under the node root by HostPath.
package volume

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/ambient-mesh/ambient/e2e/internal/nodelet/podenv"
)

// defaultMode is the file mode of ConfigMap, Secret, downwardAPI and
// projected files when the volume sets none (corev1.*DefaultMode).
const defaultMode = 0o644

// ErrNotFound is wrapped by errors for a ConfigMap, Secret or key a volume
// needs that does not exist; it is podenv.ErrNotFound, so callers can test
// for either package's errors alike.
var ErrNotFound = podenv.ErrNotFound

// ErrUnsupported is wrapped by errors for volume types nodelet cannot provide.
var ErrUnsupported = errors.New("unsupported volume type")

// Manager sets up, refreshes and tears down the volumes of the pods on one
// node. The zero value with the exported fields set is ready to use, and its
// methods are safe for concurrent use.
type Manager struct {
	// Client reads ConfigMaps and Secrets and requests service account tokens.
	Client kubernetes.Interface
	// NodeRoot is the node's root dir: hostPath volumes map under it and
	// created mount targets are recorded in NodeRoot/created-mountpoints.
	NodeRoot string
	// PodsDir holds one dir per pod UID (the kubelet's /var/lib/kubelet/pods).
	PodsDir string

	// now is the clock for token lifetimes; nil means time.Now.
	now func() time.Time

	mu sync.Mutex // guards pods and appends to created-mountpoints
	// pods holds per-pod state by UID.
	pods map[types.UID]*podState
}

// podState is what the Manager remembers of one pod.
type podState struct {
	// mu serialises Setup and Refresh of the pod and guards tokens.
	mu sync.Mutex
	// tokens caches service account tokens by "<volume>/<path>".
	tokens map[string]*token
}

func (m *Manager) clock() time.Time {
	if m.now != nil {
		return m.now()
	}
	return time.Now()
}

func (m *Manager) state(uid types.UID) *podState {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.pods == nil {
		m.pods = map[types.UID]*podState{}
	}
	st, ok := m.pods[uid]
	if !ok {
		st = &podState{tokens: map[string]*token{}}
		m.pods[uid] = st
	}
	return st
}

// Dir returns the host directory of a pod's volume.
func (m *Manager) Dir(uid types.UID, volume string) string {
	return filepath.Join(m.PodsDir, string(uid), "volumes", volume)
}

// Setup makes every volume of pod ready for Mounts. It is idempotent: files
// are rewritten only when their contents changed and a cached token is reused
// until it is due for rotation. Errors of the volumes are joined, each naming
// its volume and the missing source.
func (m *Manager) Setup(ctx context.Context, pod *corev1.Pod) error {
	st := m.state(pod.UID)
	st.mu.Lock()
	defer st.mu.Unlock()
	var errs []error
	for i := range pod.Spec.Volumes {
		v := &pod.Spec.Volumes[i]
		if err := m.setupVolumeLocked(ctx, pod, v, st); err != nil {
			errs = append(errs, fmt.Errorf("volume %q: %w", v.Name, err))
		}
	}
	return errors.Join(errs...)
}

// Refresh rotates service account tokens past 80% of their lifetime and
// rewrites ConfigMap, Secret, downwardAPI and projected volumes whose contents
// changed. A volume whose source fails keeps its old contents.
func (m *Manager) Refresh(ctx context.Context, pod *corev1.Pod) error {
	st := m.state(pod.UID)
	st.mu.Lock()
	defer st.mu.Unlock()
	var errs []error
	for i := range pod.Spec.Volumes {
		v := &pod.Spec.Volumes[i]
		if !isWritten(v) {
			continue
		}
		if err := m.setupVolumeLocked(ctx, pod, v, st); err != nil {
			errs = append(errs, fmt.Errorf("volume %q: %w", v.Name, err))
		}
	}
	return errors.Join(errs...)
}

// Teardown removes the pod's volume dirs and forgets its tokens.
func (m *Manager) Teardown(uid types.UID) error {
	if uid == "" {
		return errors.New("empty pod uid")
	}
	m.mu.Lock()
	st := m.pods[uid]
	delete(m.pods, uid)
	m.mu.Unlock()
	if st != nil {
		// Wait out a Setup or Refresh in progress.
		st.mu.Lock()
		defer st.mu.Unlock()
	}
	if err := os.RemoveAll(filepath.Join(m.PodsDir, string(uid), "volumes")); err != nil {
		return fmt.Errorf("removing volumes of pod %s: %w", uid, err)
	}
	return nil
}

// isWritten reports whether the volume's contents come from the API and are
// written by the atomic writer (and so are read-only to containers).
func isWritten(v *corev1.Volume) bool {
	return v.ConfigMap != nil || v.Secret != nil || v.DownwardAPI != nil || v.Projected != nil
}

func (m *Manager) setupVolumeLocked(ctx context.Context, pod *corev1.Pod, v *corev1.Volume, st *podState) error {
	switch {
	case v.EmptyDir != nil:
		dir := m.Dir(pod.UID, v.Name)
		if err := os.MkdirAll(dir, 0o777); err != nil {
			return fmt.Errorf("creating emptyDir: %w", err)
		}
		// World-writable like the kubelet's, so non-root processes can use it.
		if err := os.Chmod(dir, 0o777); err != nil {
			return fmt.Errorf("setting emptyDir mode: %w", err)
		}
		return nil
	case v.HostPath != nil:
		return checkHostPath(HostPath(m.NodeRoot, v.HostPath.Path), v.HostPath.Type)
	case isWritten(v):
		payload := map[string]file{}
		if err := m.payloadLocked(ctx, pod, v, st, payload); err != nil {
			return err
		}
		if _, err := writeAtomic(m.Dir(pod.UID, v.Name), payload); err != nil {
			return fmt.Errorf("writing files: %w", err)
		}
		return nil
	}
	return fmt.Errorf("%w %s", ErrUnsupported, volumeType(v))
}

// volumeType names the volume source that is set, by its JSON field name.
func volumeType(v *corev1.Volume) string {
	rv := reflect.ValueOf(v.VolumeSource)
	rt := rv.Type()
	for i := 0; i < rt.NumField(); i++ {
		if f := rv.Field(i); f.Kind() == reflect.Pointer && !f.IsNil() {
			name, _, _ := strings.Cut(rt.Field(i).Tag.Get("json"), ",")
			return name
		}
	}
	return "(none)"
}

// payloadLocked adds the files of a written volume to out.
func (m *Manager) payloadLocked(ctx context.Context, pod *corev1.Pod, v *corev1.Volume, st *podState, out map[string]file) error {
	switch {
	case v.ConfigMap != nil:
		src := v.ConfigMap
		return m.configMapFiles(ctx, pod, src.Name, src.Items, modeOr(src.DefaultMode, defaultMode), isTrue(src.Optional), out)
	case v.Secret != nil:
		src := v.Secret
		return m.secretFiles(ctx, pod, src.SecretName, src.Items, modeOr(src.DefaultMode, defaultMode), isTrue(src.Optional), out)
	case v.DownwardAPI != nil:
		return downwardAPIFiles(pod, v.DownwardAPI.Items, modeOr(v.DownwardAPI.DefaultMode, defaultMode), out)
	case v.Projected != nil:
		mode := modeOr(v.Projected.DefaultMode, defaultMode)
		for i, s := range v.Projected.Sources {
			var err error
			switch {
			case s.ConfigMap != nil:
				err = m.configMapFiles(ctx, pod, s.ConfigMap.Name, s.ConfigMap.Items, mode, isTrue(s.ConfigMap.Optional), out)
			case s.Secret != nil:
				err = m.secretFiles(ctx, pod, s.Secret.Name, s.Secret.Items, mode, isTrue(s.Secret.Optional), out)
			case s.DownwardAPI != nil:
				err = downwardAPIFiles(pod, s.DownwardAPI.Items, mode, out)
			case s.ServiceAccountToken != nil:
				err = m.tokenFile(ctx, pod, v.Name, s.ServiceAccountToken, mode, st, out)
			default:
				err = fmt.Errorf("%w: projected source %d", ErrUnsupported, i)
			}
			if err != nil {
				return err
			}
		}
		return nil
	}
	return fmt.Errorf("%w %s", ErrUnsupported, volumeType(v))
}

func (m *Manager) configMapFiles(ctx context.Context, pod *corev1.Pod, name string, items []corev1.KeyToPath, mode fs.FileMode, optional bool, out map[string]file) error {
	cm, err := m.Client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		if optional {
			return nil
		}
		return fmt.Errorf("configmap %q %w", name, ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("getting configmap %q: %w", name, err)
	}
	data := make(map[string][]byte, len(cm.Data)+len(cm.BinaryData))
	for k, v := range cm.Data {
		data[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		data[k] = v
	}
	return keyFiles("configmap", name, data, items, mode, optional, out)
}

func (m *Manager) secretFiles(ctx context.Context, pod *corev1.Pod, name string, items []corev1.KeyToPath, mode fs.FileMode, optional bool, out map[string]file) error {
	s, err := m.Client.CoreV1().Secrets(pod.Namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		if optional {
			return nil
		}
		return fmt.Errorf("secret %q %w", name, ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("getting secret %q: %w", name, err)
	}
	return keyFiles("secret", name, s.Data, items, mode, optional, out)
}

// keyFiles projects data's keys as files: all keys by their own names, or
// only items' keys at items' paths.
func keyFiles(kind, name string, data map[string][]byte, items []corev1.KeyToPath, mode fs.FileMode, optional bool, out map[string]file) error {
	if len(items) == 0 {
		for k, v := range data {
			out[k] = file{data: v, mode: mode}
		}
		return nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			if optional {
				continue
			}
			return fmt.Errorf("key %q in %s %q %w", it.Key, kind, name, ErrNotFound)
		}
		out[it.Path] = file{data: v, mode: modeOr(it.Mode, mode)}
	}
	return nil
}

func downwardAPIFiles(pod *corev1.Pod, items []corev1.DownwardAPIVolumeFile, mode fs.FileMode, out map[string]file) error {
	for _, it := range items {
		var (
			val string
			err error
		)
		switch {
		case it.FieldRef != nil:
			val, err = podenv.FieldRef(pod, it.FieldRef, podenv.Params{})
		case it.ResourceFieldRef != nil:
			val, err = podenv.ResourceField(pod, nil, it.ResourceFieldRef)
		default:
			err = errors.New("no fieldRef or resourceFieldRef")
		}
		if err != nil {
			return fmt.Errorf("downwardAPI %s: %w", it.Path, err)
		}
		out[it.Path] = file{data: []byte(val), mode: modeOr(it.Mode, mode)}
	}
	return nil
}

func modeOr(m *int32, def fs.FileMode) fs.FileMode {
	if m == nil {
		return def
	}
	return fs.FileMode(*m) & fs.ModePerm
}

func isTrue(b *bool) bool { return b != nil && *b }
