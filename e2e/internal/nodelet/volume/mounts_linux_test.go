package volume

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

func TestMain(m *testing.M) {
	nsexec.Init()
	os.Exit(m.Run())
}

// TestMountsWorkInAPrivateMountNamespace applies the mounts with nsexec, as
// nodelet does, and reads the volumes through their targets.
func TestMountsWorkInAPrivateMountNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mount namespaces need root")
	}
	e := newEnv(t, cm("kube-root-ca.crt", map[string]string{"ca.crt": "CA"}), cm("cfg", map[string]string{"app.yaml": "x: 1"}))
	ctrRoot := filepath.Join(e.root, "ctr")
	p := projectedPod()
	p.Spec.Volumes = append(p.Spec.Volumes,
		corev1.Volume{Name: "cfg", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}}}},
		corev1.Volume{Name: "data", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
	)
	sa := ctrRoot + "/var/run/secrets/kubernetes.io/serviceaccount"
	p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{
		{Name: "kube-api-access", MountPath: sa, ReadOnly: true},
		{Name: "cfg", MountPath: ctrRoot + "/etc/app.yaml", SubPath: "app.yaml"},
		{Name: "data", MountPath: ctrRoot + "/data"},
		{Name: "cfg", MountPath: ctrRoot + "/data/cfg"}, // nested in the emptyDir
	}
	if err := e.m.Setup(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	mounts, err := e.m.Mounts(p, &p.Spec.Containers[0])
	if err != nil {
		t.Fatal(err)
	}
	script := strings.Join([]string{
		"cat " + sa + "/ca.crt " + sa + "/namespace " + ctrRoot + "/etc/app.yaml " + ctrRoot + "/data/cfg/app.yaml",
		"echo hi > " + ctrRoot + "/data/written",
		"touch " + sa + "/nope 2>/dev/null && echo WRITABLE",
		"true",
	}, "; ")
	cmd, err := nsexec.Command(nsexec.Spec{PrivateMounts: true, Mounts: mounts, Argv: []string{"/bin/sh", "-c", script}})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	if got, want := out.String(), "CAappx: 1x: 1"; got != want {
		t.Errorf("output %q, want %q", got, want)
	}
	if b, err := os.ReadFile(filepath.Join(e.m.Dir(p.UID, "data"), "written")); err != nil || string(b) != "hi\n" {
		t.Errorf("emptyDir write: %q %v", b, err)
	}
	// On the host the targets are plain (empty) mountpoints.
	if entries, _ := os.ReadDir(sa); len(entries) != 0 {
		t.Errorf("host target %s is not empty: %v", sa, entries)
	}
}
