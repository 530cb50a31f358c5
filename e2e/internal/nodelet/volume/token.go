package volume

import (
	"context"
	"fmt"
	"io/fs"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const (
	// defaultTokenSeconds is serviceAccountToken's expirationSeconds default.
	defaultTokenSeconds = 3600
	// minTokenSeconds is the shortest lifetime the API allows a projected token.
	minTokenSeconds = 600
	// refreshFraction of a token's lifetime passes before it is re-requested,
	// as in the kubelet's token manager.
	refreshFraction = 0.8
)

// token is a cached service account token.
type token struct {
	value     []byte
	refreshAt time.Time
}

// tokenFile adds a service account token file to out, requesting a new token
// from the API server when there is none cached or the cached one is due.
func (m *Manager) tokenFile(ctx context.Context, pod *corev1.Pod, volume string, src *corev1.ServiceAccountTokenProjection, mode fs.FileMode, st *podState, out map[string]file) error {
	key := volume + "/" + src.Path
	now := m.clock()
	if t, ok := st.tokens[key]; ok && now.Before(t.refreshAt) {
		out[src.Path] = file{data: t.value, mode: mode}
		return nil
	}
	secs := int64(defaultTokenSeconds)
	if src.ExpirationSeconds != nil {
		secs = max(*src.ExpirationSeconds, minTokenSeconds)
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	req := &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			ExpirationSeconds: &secs,
			BoundObjectRef: &authenticationv1.BoundObjectReference{
				APIVersion: "v1", Kind: "Pod", Name: pod.Name, UID: pod.UID,
			},
		},
	}
	if src.Audience != "" {
		req.Spec.Audiences = []string{src.Audience}
	}
	tr, err := m.Client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("requesting token for service account %q: %w", sa, err)
	}
	if tr.Status.Token == "" {
		return fmt.Errorf("requesting token for service account %q: empty token", sa)
	}
	// The lifetime is what was asked for, or less if the server says so; a
	// server that extends it (--service-account-extend-token-expiration)
	// still sees us rotate on the requested schedule, as pods expect.
	life := time.Duration(secs) * time.Second
	if exp := tr.Status.ExpirationTimestamp.Time; !exp.IsZero() && exp.Sub(now) < life {
		life = exp.Sub(now)
	}
	t := &token{
		value:     []byte(tr.Status.Token),
		refreshAt: now.Add(time.Duration(float64(life) * refreshFraction)),
	}
	st.tokens[key] = t
	out[src.Path] = file{data: t.value, mode: mode}
	return nil
}
