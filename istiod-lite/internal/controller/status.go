package controller

import (
	"context"

	"google.golang.org/protobuf/types/known/timestamppb"
	metav1alpha1 "istio.io/api/meta/v1alpha1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambient-mesh/ambient/istiod-lite/internal/model"
)

// ownedConditions are the condition types this controller writes; others on
// the object (a waypoint's, an analyzer's) are left alone.
var ownedConditions = map[string]bool{model.ConditionZtunnelAccepted: true}

// writeStatus brings the owned conditions of every AuthorizationPolicy to
// what Compute decided, writing only the policies whose conditions changed.
func (c *Controller) writeStatus(ctx context.Context, res model.Resources) {
	for key, want := range res.PolicyStatus {
		pol, err := c.authz.AuthorizationPolicies(key.Namespace).Get(key.Name)
		if err != nil {
			continue // deleted since the snapshot
		}
		conds, changed := mergeConditions(pol.Status.Conditions, want, metav1.Now())
		if !changed {
			continue
		}
		upd := pol.DeepCopy()
		upd.Status.Conditions = conds
		_, err = c.istio.SecurityV1().AuthorizationPolicies(key.Namespace).UpdateStatus(ctx, upd, metav1.UpdateOptions{})
		switch {
		case err == nil:
			c.statusWrites.WithLabelValues("written").Inc()
		case isRetryable(err):
			// A newer object is on its way through the informer, or it is gone;
			// the event it brings triggers another attempt.
			c.statusWrites.WithLabelValues("conflict").Inc()
			c.markDirty()
		default:
			c.statusWrites.WithLabelValues("error").Inc()
			c.log.Warn("writing AuthorizationPolicy status", "policy", types.NamespacedName(key).String(), "err", err)
		}
	}
}

// mergeConditions replaces the owned condition types in current with want,
// keeping LastTransitionTime when a condition's status did not change.
func mergeConditions(current []*metav1alpha1.IstioCondition, want []metav1.Condition, now metav1.Time) ([]*metav1alpha1.IstioCondition, bool) {
	out := make([]*metav1alpha1.IstioCondition, 0, len(current)+len(want))
	byType := map[string]*metav1alpha1.IstioCondition{}
	changed := false
	for _, cur := range current {
		if cur == nil {
			continue
		}
		if ownedConditions[cur.Type] {
			byType[cur.Type] = cur
			continue
		}
		out = append(out, cur)
	}
	wanted := map[string]bool{}
	for _, w := range want {
		wanted[w.Type] = true
		cur := byType[w.Type]
		next := &metav1alpha1.IstioCondition{
			Type: w.Type, Status: string(w.Status), Reason: w.Reason, Message: w.Message, ObservedGeneration: w.ObservedGeneration,
			LastTransitionTime: timestamppb.New(now.Time),
		}
		if cur != nil && cur.Status == next.Status {
			next.LastTransitionTime = cur.LastTransitionTime
		}
		if cur == nil || cur.Status != next.Status || cur.Reason != next.Reason || cur.Message != next.Message ||
			cur.ObservedGeneration != next.ObservedGeneration {
			changed = true
		}
		out = append(out, next)
	}
	for t := range byType {
		if !wanted[t] {
			changed = true // an owned condition that no longer applies
		}
	}
	if !changed {
		return current, false
	}
	return out, true
}
