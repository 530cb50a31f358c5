package ca

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func namespace(name string, terminating bool) *corev1.Namespace {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if terminating {
		ns.Status.Phase = corev1.NamespaceTerminating
	}
	return ns
}

func TestPublishRoot(t *testing.T) {
	const root = "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n"
	c := fake.NewClientset(
		namespace("default", false),
		namespace("stale", false),
		namespace("going-away", true),
		&corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Namespace: "stale", Name: RootConfigMapName},
			Data:       map[string]string{RootConfigMapKey: "an old root", "other": "kept"},
		},
	)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- PublishRoot(ctx, c, []byte(root)) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("PublishRoot returned %v after cancel, want nil", err)
		}
	}()

	cms := func(ns string) (*corev1.ConfigMap, error) {
		return c.CoreV1().ConfigMaps(ns).Get(context.Background(), RootConfigMapName, metav1.GetOptions{})
	}
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting until %s", what)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	hasRoot := func(ns string) func() bool {
		return func() bool {
			cm, err := cms(ns)
			return err == nil && cm.Data[RootConfigMapKey] == root
		}
	}

	waitFor("default has the root", hasRoot("default"))
	waitFor("stale's edited root is fixed", hasRoot("stale"))
	if cm, _ := cms("stale"); cm.Data["other"] != "kept" {
		t.Errorf("fixing the root dropped other keys: %v", cm.Data)
	}
	waitFor("watches are established", func() bool {
		var ns, cm bool
		for _, a := range c.Actions() {
			if a.GetVerb() == "watch" {
				ns = ns || a.GetResource().Resource == "namespaces"
				cm = cm || a.GetResource().Resource == "configmaps"
			}
		}
		return ns && cm
	})

	// Deleted: recreated.
	if err := c.CoreV1().ConfigMaps("default").Delete(ctx, RootConfigMapName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("a deleted configmap is recreated", hasRoot("default"))

	// Edited: fixed.
	cm, _ := cms("default")
	cm.Data[RootConfigMapKey] = "tampered"
	if _, err := c.CoreV1().ConfigMaps("default").Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("an edited configmap is fixed", hasRoot("default"))

	// New namespace: published there too.
	if _, err := c.CoreV1().Namespaces().Create(ctx, namespace("new", false), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("a new namespace gets the root", hasRoot("new"))

	if _, err := cms("going-away"); !apierrors.IsNotFound(err) {
		t.Errorf("a terminating namespace got a configmap (err=%v)", err)
	}
}

func TestPublishRootRefusesAnEmptyRoot(t *testing.T) {
	if err := PublishRoot(context.Background(), fake.NewClientset(), nil); err == nil {
		t.Fatal("an empty root was accepted")
	}
}
